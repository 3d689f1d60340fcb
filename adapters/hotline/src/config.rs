//! The adapter's configuration file (TOML). See adapters/README.md.

use serde::Deserialize;

use rating_hub_adapter_kit::{AtRestConfig, CallbackAuthConfig, HubConnection};

use crate::reply::Scale;

fn d_listen() -> String {
    "127.0.0.1:8081".into()
}
fn d_spool() -> String {
    "hotline-spool.db".into()
}
fn d_state() -> String {
    "hotline-state.db".into()
}
fn d_scale() -> u32 {
    5
}
fn d_ttl() -> u64 {
    72
}
fn d_poll() -> u64 {
    30
}
fn d_template() -> String {
    "您办理的“{item}”已办结。请回复数字评价：1非常满意 2满意 3基本满意 4不满意 5非常不满意".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// The gateway's send interface: POST JSON {phone_number, content, extension}.
    pub url: String,
    /// Digits put before the survey number to make its reply code (dest_code).
    #[serde(default)]
    pub extension_prefix: String,
    /// The invitation text; {item} is replaced by the item name.
    #[serde(default = "d_template")]
    pub template: String,
    /// CA of an https gateway (empty: plain http inside the department network).
    #[serde(default)]
    pub ca: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HotlineConfig {
    /// Address for the gateway callbacks and IVR results.
    #[serde(default = "d_listen")]
    pub listen: String,
    /// The durable spool of ratings on their way to the hub.
    #[serde(default = "d_spool")]
    pub spool: String,
    /// Surveys, unmatched replies and the invitation cursor.
    #[serde(default = "d_state")]
    pub state: String,
    /// Levels the SMS prompt offers (3, 4 or 5) and the IVR menu offers.
    #[serde(default = "d_scale")]
    pub sms_scale: u32,
    #[serde(default = "d_scale")]
    pub ivr_scale: u32,
    /// Hours a survey accepts replies.
    #[serde(default = "d_ttl")]
    pub survey_ttl_hours: u64,
    /// Seconds between pulls of the hub's invitations (0: never pull).
    #[serde(default = "d_poll")]
    pub poll_invitations_secs: u64,
    pub hub: HubConnection,
    pub gateway: Option<GatewayConfig>,
    /// How the gateway's and the IVR's callbacks are authenticated (signed by default).
    #[serde(default)]
    pub callback_auth: CallbackAuthConfig,
    /// Sealing of personal data in the spool and state files, and how long finished rows
    /// are kept.
    #[serde(default)]
    pub at_rest: AtRestConfig,
}

impl HotlineConfig {
    pub fn load(path: &str) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {path}: {e}"))?;
        let c: Self = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
        c.scales()?;
        Ok(c)
    }

    pub fn scales(&self) -> anyhow::Result<(Scale, Scale)> {
        let sms = Scale::from_levels(self.sms_scale)
            .ok_or_else(|| anyhow::anyhow!("sms_scale must be 3, 4 or 5"))?;
        let ivr = Scale::from_levels(self.ivr_scale)
            .ok_or_else(|| anyhow::anyhow!("ivr_scale must be 3, 4 or 5"))?;
        Ok((sms, ivr))
    }
}
