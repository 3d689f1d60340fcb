//! Boots a real hub and hands out typed clients and valid test data.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use prost_types::Timestamp;
use rating_hub::config::Config;
use rating_hub::domain::codes::{credit_code_with_check, id_number_with_check};
use rating_hub::pb::v1 as pb;
use rating_hub::server::RunningHub;
use tempfile::TempDir;
use tonic::transport::Channel;
use tonic_types::StatusExt;

pub use pb::ingest_service_client::IngestServiceClient;
pub use pb::query_service_client::QueryServiceClient;

pub struct TestHub {
    pub hub: RunningHub,
    pub dir: TempDir,
}

impl TestHub {
    /// A fresh hub on a fresh database.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// A fresh hub with extra `RATING_HUB__…`-style overrides, e.g. ("validation", "require_reason_for_bad", "false").
    pub async fn start_with(overrides: &[(&str, &str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let hub = start_hub(dir.path(), overrides).await;
        Self { hub, dir }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.hub.local_addr)
    }

    pub async fn ingest(&self) -> IngestServiceClient<Channel> {
        IngestServiceClient::connect(self.url())
            .await
            .expect("connect ingest")
    }

    pub async fn query(&self) -> QueryServiceClient<Channel> {
        QueryServiceClient::connect(self.url())
            .await
            .expect("connect query")
    }

    /// Graceful stop; the directory (and database) stays for a restart.
    pub async fn stop(self) -> TempDir {
        self.hub.shutdown().await.expect("clean shutdown");
        self.dir
    }

    /// Starts a new hub on the same database file.
    pub async fn restart_in(dir: TempDir) -> Self {
        let hub = start_hub(dir.path(), &[]).await;
        Self { hub, dir }
    }
}

pub async fn start_hub(dir: &Path, overrides: &[(&str, &str, &str)]) -> RunningHub {
    let mut env = vec![
        (
            "RATING_HUB__SERVER__LISTEN".to_owned(),
            "\"127.0.0.1:0\"".to_owned(),
        ),
        (
            "RATING_HUB__STORAGE__URL".to_owned(),
            format!("\"{}\"", dir.join("hub.db").display()),
        ),
    ];
    for (section, key, value) in overrides {
        env.push((
            format!(
                "RATING_HUB__{}__{}",
                section.to_uppercase(),
                key.to_uppercase()
            ),
            value.to_string(),
        ));
    }
    let config = Config::from_layers(None, env.into_iter()).expect("test config");
    rating_hub::server::start(&config)
        .await
        .expect("hub starts")
}

pub fn now() -> Timestamp {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: 0,
    }
}

pub fn ts(seconds: i64) -> Timestamp {
    Timestamp { seconds, nanos: 0 }
}

/// A valid organisation credit code, distinct per `n`.
pub fn org(n: u32) -> String {
    credit_code_with_check(&format!("11530100MA{n:07}")).unwrap()
}

/// A valid resident ID number.
pub fn id_number() -> String {
    id_number_with_check("53010219800101123").unwrap()
}

/// A valid item rating of org(1) in Kunming (530102), rated now.
pub fn rating(key: &str) -> pb::Rating {
    pb::Rating {
        source_key: key.to_owned(),
        channel: pb::Channel::HallDevice as i32,
        level: pb::Level::VerySatisfied as i32,
        target_kind: pb::TargetKind::Item as i32,
        case_number: format!("CASE-{key}"),
        item_code: "530100-ITEM-001".into(),
        item_name: "企业设立登记".into(),
        region_code: "530102".into(),
        org_credit_code: org(1),
        org_name: "五华区政务服务中心".into(),
        hall_id: "H1".into(),
        window_id: "W3".into(),
        staff_id: "S007".into(),
        rated_at: Some(now()),
        rater: Some(pb::Rater {
            kind: pb::RaterKind::NaturalPerson as i32,
            real_name: true,
            name: "张三".into(),
            id_number: id_number(),
            phone: "13800138000".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub async fn submit(
    client: &mut IngestServiceClient<Channel>,
    ratings: Vec<pb::Rating>,
) -> Vec<pb::ItemResult> {
    client
        .submit_ratings(pb::SubmitRatingsRequest { ratings })
        .await
        .expect("SubmitRatings succeeds")
        .into_inner()
        .results
}

/// Submits one rating and returns its result.
pub async fn submit_one(
    client: &mut IngestServiceClient<Channel>,
    r: pb::Rating,
) -> pb::ItemResult {
    submit(client, vec![r]).await.remove(0)
}

pub fn outcome(r: &pb::ItemResult) -> pb::Outcome {
    pb::Outcome::try_from(r.outcome).unwrap()
}

/// The field names of a BadRequest detail on a status.
pub fn bad_request_fields(status: &tonic::Status) -> Vec<String> {
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let details = status.get_error_details();
    let br = details
        .bad_request()
        .expect("a google.rpc.BadRequest detail");
    br.field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect()
}
