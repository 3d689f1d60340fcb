//! Policy profiles (data/profiles.toml plus the deployment's own) and which region follows
//! which profile.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::pb::v1::Level;

pub const DEFAULT_PROFILES_TOML: &str = include_str!("data/profiles.toml");

/// 好评 / 中评 / 差评.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    Good,
    Medium,
    Bad,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DayUnit {
    WorkingDays,
    NaturalDays,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultRatingRule {
    pub after: u32,
    pub unit: DayUnit,
    /// A LEVEL_* name.
    pub level: String,
}

fn default_classes() -> [Class; 5] {
    [
        Class::Good,
        Class::Good,
        Class::Medium,
        Class::Bad,
        Class::Bad,
    ]
}
fn one() -> u32 {
    1
}
fn fifteen() -> u32 {
    15
}

/// One jurisdiction's rules. See data/profiles.toml for what each field means.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    #[serde(default)]
    pub title: String,
    pub scores: Option<[f64; 5]>,
    #[serde(default = "default_classes")]
    pub classes: [Class; 5],
    pub default_rating: Option<DefaultRatingRule>,
    pub reminder_after_hours: Option<u32>,
    pub contact_working_days: Option<u32>,
    /// Unset: 15, unless the unit declares its deadline (`rectify_deadline_declared`).
    pub rectify_working_days: Option<u32>,
    /// The rated unit declares its rectification deadline (DECLARE_DEADLINE) and overdue is
    /// measured against it: where the text sets no number of days (Ordos 第二十条(二)
    /// 「不能及时整改的应明确整改措施和完成时限」; Guangdong 「限期」; Changchun 「承诺整改时限」).
    #[serde(default)]
    pub rectify_deadline_declared: bool,
    /// An appeal needs evidence: references, or files attached to the case (Ordos 第十七条
    /// 「需在5个工作日内申诉并提供举证材料」).
    #[serde(default)]
    pub appeal_requires_evidence: bool,
    /// Only the rater raises an invalid rating (Ordos 第十六条「须由评价主体提出」): INVALID is
    /// decided only on an appeal raised by the rater; the unit's appeal can end UPHELD or
    /// MALICIOUS.
    #[serde(default)]
    pub invalid_raised_by_rater: bool,
    /// The rated staff member may not contact the rater (Ordos 第二十条(一)「不得由被评价人与
    /// 评价人直接沟通」): CONTACT names who did (`contacted_by`), and it is not them.
    #[serde(default)]
    pub contact_not_by_rated_staff: bool,
    /// Where the unit declares its deadline: it declares (or rectifies) within this many
    /// working days of the case's opening, or the case is overdue (15 if unset: the working
    /// days the national baseline and the Yunnan and Kunming texts give to rectify).
    pub declare_within_working_days: Option<u32>,
    /// … and may declare a deadline at most this many working days after the opening; a later
    /// one is the authority's (the `admin` role) to set (60 if unset).
    pub declared_deadline_max_working_days: Option<u32>,
    /// One staff rating per window visit (`Rating.visit_id`), not per case: Guangdong
    /// 第十四条「评价人每次到窗口办理后均可对服务人员进行1次评价」.
    #[serde(default)]
    pub staff_rating_per_visit: bool,
    pub appeal_window_working_days: Option<u32>,
    pub appeal_review_working_days: Option<u32>,
    #[serde(default = "one")]
    pub follow_up_limit: u32,
    #[serde(default = "fifteen")]
    pub follow_up_window_days: u32,
    #[serde(default)]
    pub spot_check_share: f64,
    pub final_score: Option<String>,
    /// Rating is by real name (Ordos: "实行实名制评价"): an anonymous rating is accepted —
    /// every rating counts — and flagged `QUALITY_FLAG_NOT_REAL_NAME` for follow-up.
    #[serde(default)]
    pub real_name_required: bool,
}

fn level_index(level: Level) -> Option<usize> {
    match level {
        Level::VerySatisfied => Some(0),
        Level::Satisfied => Some(1),
        Level::BasicallySatisfied => Some(2),
        Level::Dissatisfied => Some(3),
        Level::VeryDissatisfied => Some(4),
        Level::Unspecified => None,
    }
}

impl Profile {
    pub fn score(&self, level: Level) -> Option<f64> {
        Some(self.scores?[level_index(level)?])
    }

    pub fn class(&self, level: Level) -> Option<Class> {
        Some(self.classes[level_index(level)?])
    }

    /// Working days to rectify, counted from the case's opening; `None` when the unit
    /// declares its own deadline.
    pub fn rectify_days(&self) -> Option<u32> {
        if self.rectify_deadline_declared {
            None
        } else {
            Some(self.rectify_working_days.unwrap_or(15))
        }
    }

    pub fn default_level(&self) -> Option<Level> {
        self.default_rating
            .as_ref()
            .and_then(|d| Level::from_str_name(&d.level))
    }

    fn check(&self, name: &str) -> Result<(), String> {
        if let Some(d) = &self.default_rating {
            if Level::from_str_name(&d.level).is_none_or(|l| l == Level::Unspecified) {
                return Err(format!(
                    "profile {name}: default_rating.level {:?} is not a level",
                    d.level
                ));
            }
            if Level::from_str_name(&d.level).is_some_and(crate::domain::rating::is_bad) {
                // A default stands in for a rater who did not rate (and the hub refuses a
                // default 差评: docs/decisions/0006).
                return Err(format!(
                    "profile {name}: default_rating.level {:?} is a 差评; a default rating \
                     is 满意 or 基本满意",
                    d.level
                ));
            }
            if d.after == 0 {
                return Err(format!(
                    "profile {name}: default_rating.after must be at least 1"
                ));
            }
        }
        if self.rectify_deadline_declared && self.rectify_working_days.is_some() {
            return Err(format!(
                "profile {name}: rectify_working_days and rectify_deadline_declared exclude \
                 each other (the unit declares its deadline, or the profile counts it)"
            ));
        }
        if !(0.0..=1.0).contains(&self.spot_check_share) {
            return Err(format!(
                "profile {name}: spot_check_share must be within 0..1"
            ));
        }
        if let Some(f) = &self.final_score
            && f != "kunming"
        {
            return Err(format!(
                "profile {name}: final_score {f:?} is not known (\"kunming\")"
            ));
        }
        if self.final_score.is_some() && self.scores.is_none() {
            return Err(format!("profile {name}: a final score needs scores"));
        }
        Ok(())
    }
}

/// Kunming's 10-point final score: acceptance rate ≥ 95 % → 3, 80–95 % → 1, below → 0; plus
/// average score ≥ 9.5 → 7, 8–9.5 → 5, 6–8 → 3, below → 0.
pub fn kunming_final_score(acceptance_rate: f64, average_score: f64) -> f64 {
    let acceptance = if acceptance_rate >= 0.95 {
        3.0
    } else if acceptance_rate >= 0.80 {
        1.0
    } else {
        0.0
    };
    let average = if average_score >= 9.5 {
        7.0
    } else if average_score >= 8.0 {
        5.0
    } else if average_score >= 6.0 {
        3.0
    } else {
        0.0
    };
    acceptance + average
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfilesFile {
    profiles: BTreeMap<String, Profile>,
    #[serde(default)]
    regions: BTreeMap<String, String>,
}

/// Every profile and the region map.
#[derive(Debug, Clone)]
pub struct Profiles {
    profiles: BTreeMap<String, Profile>,
    regions: BTreeMap<String, String>,
}

impl Profiles {
    /// The shipped profiles, with the deployment's profiles and region map laid over them.
    pub fn load(
        extra_profiles: &BTreeMap<String, Profile>,
        extra_regions: &BTreeMap<String, String>,
    ) -> Result<Self, String> {
        let file: ProfilesFile =
            toml::from_str(DEFAULT_PROFILES_TOML).map_err(|e| format!("shipped profiles: {e}"))?;
        let mut p = Self {
            profiles: file.profiles,
            regions: file.regions,
        };
        p.profiles.extend(extra_profiles.clone());
        p.regions.extend(extra_regions.clone());
        for (name, profile) in &p.profiles {
            profile.check(name)?;
        }
        for (prefix, name) in &p.regions {
            if !prefix.bytes().all(|b| b.is_ascii_digit()) || prefix.is_empty() {
                return Err(format!(
                    "rules.regions: {prefix:?} is not a region-code prefix"
                ));
            }
            if !p.profiles.contains_key(name) {
                return Err(format!(
                    "rules.regions: {prefix} maps to unknown profile {name:?}"
                ));
            }
        }
        if !p.profiles.contains_key("default") {
            return Err("a profile named \"default\" is required".into());
        }
        Ok(p)
    }

    pub fn shipped() -> Self {
        Self::load(&BTreeMap::new(), &BTreeMap::new()).expect("shipped profiles are valid")
    }

    pub fn get(&self, name: &str) -> Option<&Profile> {
        self.profiles.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.profiles.keys().map(String::as_str)
    }

    /// The profile name that governs a region: the longest mapped prefix, else "default".
    pub fn name_for_region(&self, region: &str) -> &str {
        self.regions
            .iter()
            .filter(|(prefix, _)| region.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .map_or("default", |(_, name)| name.as_str())
    }

    pub fn for_region(&self, region: &str) -> (&str, &Profile) {
        let name = self.name_for_region(region);
        (name, &self.profiles[name])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kunming_final_score_at_every_boundary() {
        let cases = [
            // (acceptance, average) → score
            ((0.95, 9.5), 10.0),
            ((0.9499, 9.5), 8.0),
            ((0.80, 9.4999), 6.0),
            ((0.7999, 8.0), 5.0),
            ((1.0, 7.9999), 6.0),
            ((1.0, 6.0), 6.0),
            ((1.0, 5.9999), 3.0),
            ((0.0, 0.0), 0.0),
            ((0.80, 6.0), 4.0),
        ];
        for ((acc, avg), want) in cases {
            assert_eq!(
                kunming_final_score(acc, avg),
                want,
                "acceptance {acc}, average {avg}"
            );
        }
    }

    #[test]
    fn guangdong_and_kunming_score_the_same_levels_as_their_tables_say() {
        let p = Profiles::shipped();
        let (km, gd) = (p.get("kunming").unwrap(), p.get("guangdong").unwrap());
        let levels = [
            Level::VerySatisfied,
            Level::Satisfied,
            Level::BasicallySatisfied,
            Level::Dissatisfied,
            Level::VeryDissatisfied,
        ];
        let km_scores: Vec<f64> = levels.iter().map(|l| km.score(*l).unwrap()).collect();
        let gd_scores: Vec<f64> = levels.iter().map(|l| gd.score(*l).unwrap()).collect();
        assert_eq!(km_scores, [10.0, 8.0, 6.0, 2.0, 0.0]);
        assert_eq!(gd_scores, [10.0, 8.0, 6.0, 3.0, 0.0]);
        // They differ only at 不满意: 2 against 3.
        let diff: Vec<usize> = (0..5).filter(|i| km_scores[*i] != gd_scores[*i]).collect();
        assert_eq!(diff, [3]);
        assert!(p.get("yunnan").unwrap().score(Level::Satisfied).is_none());
    }

    #[test]
    fn regions_follow_the_longest_prefix() {
        let p = Profiles::shipped();
        assert_eq!(p.name_for_region("530102"), "kunming");
        assert_eq!(p.name_for_region("530302"), "yunnan");
        assert_eq!(p.name_for_region("440103"), "guangdong");
        assert_eq!(p.name_for_region("150602"), "ordos");
        assert_eq!(p.name_for_region("110105"), "default");
    }

    #[test]
    fn default_rating_rules_as_the_texts_say() {
        let p = Profiles::shipped();
        let km = p.get("kunming").unwrap().default_rating.clone().unwrap();
        assert_eq!((km.after, km.unit), (5, DayUnit::WorkingDays));
        assert_eq!(
            p.get("kunming").unwrap().default_level(),
            Some(Level::BasicallySatisfied)
        );
        let ordos = p.get("ordos").unwrap();
        assert_eq!(
            ordos.default_rating.as_ref().map(|d| (d.after, d.unit)),
            Some((7, DayUnit::NaturalDays))
        );
        assert_eq!(ordos.default_level(), Some(Level::Satisfied));
        assert!(p.get("guangdong").unwrap().default_rating.is_none());
        assert_eq!(p.get("guangdong").unwrap().reminder_after_hours, Some(24));
    }

    #[test]
    fn bad_custom_profiles_are_named() {
        let mut extra = BTreeMap::new();
        extra.insert(
            "mine".to_string(),
            Profile {
                default_rating: Some(DefaultRatingRule {
                    after: 3,
                    unit: DayUnit::WorkingDays,
                    level: "GREAT".into(),
                }),
                ..Profiles::shipped().get("default").unwrap().clone()
            },
        );
        let e = Profiles::load(&extra, &BTreeMap::new()).unwrap_err();
        assert!(e.contains("mine") && e.contains("GREAT"), "{e}");
        // A default 差评 would be refused by the writer at every tick: refused at load.
        extra.get_mut("mine").unwrap().default_rating = Some(DefaultRatingRule {
            after: 3,
            unit: DayUnit::WorkingDays,
            level: "LEVEL_DISSATISFIED".into(),
        });
        let e = Profiles::load(&extra, &BTreeMap::new()).unwrap_err();
        assert!(e.contains("mine") && e.contains("差评"), "{e}");
        let mut regions = BTreeMap::new();
        regions.insert("53".to_string(), "nope".to_string());
        assert!(Profiles::load(&BTreeMap::new(), &regions).is_err());
    }
}
