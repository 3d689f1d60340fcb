//! The `grpc` sink: another rating-hub's `IngestService.SubmitRatings`, over mTLS, as a
//! principal with the relay role. The rating keeps its hub id; the source key sent is the hub
//! id (so the upstream dedupes re-sends), and the origin fields keep where it entered.

use async_trait::async_trait;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::config::UpstreamConfig;
use super::sink::{Delivery, SendError, Sink};
use crate::pb::v1 as pb;
use crate::pb::v1::ingest_service_client::IngestServiceClient;

pub fn code_from_name(name: &str) -> Option<Code> {
    const CODES: [Code; 17] = [
        Code::Ok,
        Code::Cancelled,
        Code::Unknown,
        Code::InvalidArgument,
        Code::DeadlineExceeded,
        Code::NotFound,
        Code::AlreadyExists,
        Code::PermissionDenied,
        Code::ResourceExhausted,
        Code::FailedPrecondition,
        Code::Aborted,
        Code::OutOfRange,
        Code::Unimplemented,
        Code::Internal,
        Code::Unavailable,
        Code::DataLoss,
        Code::Unauthenticated,
    ];
    let wanted = name.trim().to_ascii_uppercase();
    CODES.into_iter().find(|c| {
        format!("{c:?}")
            .chars()
            .flat_map(|ch| {
                if ch.is_uppercase() {
                    vec!['_', ch]
                } else {
                    vec![ch.to_ascii_uppercase()]
                }
            })
            .collect::<String>()
            .trim_start_matches('_')
            == wanted
    })
}

pub struct GrpcSink {
    client: IngestServiceClient<Channel>,
    permanent: Vec<Code>,
}

impl GrpcSink {
    pub fn new(cfg: &UpstreamConfig) -> anyhow::Result<Self> {
        let mut endpoint = Endpoint::from_shared(cfg.endpoint.clone())?
            .timeout(cfg.timeout())
            .connect_timeout(cfg.timeout())
            .tcp_nodelay(true);
        if cfg.endpoint.starts_with("https://") {
            let mut tls = ClientTlsConfig::new();
            if !cfg.ca.is_empty() {
                tls = tls.ca_certificate(Certificate::from_pem(std::fs::read(&cfg.ca)?));
            }
            if !cfg.cert.is_empty() {
                tls = tls.identity(Identity::from_pem(
                    std::fs::read(&cfg.cert)?,
                    std::fs::read(&cfg.key)?,
                ));
            }
            if !cfg.tls_domain.is_empty() {
                tls = tls.domain_name(cfg.tls_domain.clone());
            }
            endpoint = endpoint.tls_config(tls)?;
        }
        Ok(Self {
            client: IngestServiceClient::new(endpoint.connect_lazy())
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
            permanent: cfg
                .permanent_errors
                .iter()
                .filter_map(|n| code_from_name(n))
                .collect(),
        })
    }
}

/// The rating as a relaying hub sends it.
pub fn relayed(r: &pb::Rating) -> pb::Rating {
    let mut out = r.clone();
    if out.origin_source_system.is_empty() {
        out.origin_source_system = r.source_system.clone();
        out.origin_source_key = r.source_key.clone();
    }
    out.source_key = r.hub_id.clone();
    out.source_system.clear();
    out.quality_flags.clear();
    out.received_at = None;
    out.feed_sequence = 0;
    out
}

#[async_trait]
impl Sink for GrpcSink {
    async fn report_head(
        &self,
        report: pb::ReportTreeHeadRequest,
    ) -> Result<Option<pb::ReportTreeHeadResponse>, SendError> {
        match self.client.clone().report_tree_head(report).await {
            Ok(r) => Ok(Some(r.into_inner())),
            // An upper hub from before the log, or one that has no key registered for this
            // hub: nothing to report to.
            Err(s) if matches!(s.code(), Code::Unimplemented | Code::FailedPrecondition) => Err(
                SendError::Permanent(format!("{:?}: {}", s.code(), s.message())),
            ),
            Err(s) => Err(SendError::Retryable(format!(
                "{:?}: {}",
                s.code(),
                s.message()
            ))),
        }
    }

    async fn send(&self, ratings: &[pb::Rating]) -> Result<Vec<Delivery>, SendError> {
        let request = pb::SubmitRatingsRequest {
            ratings: ratings.iter().map(relayed).collect(),
        };
        let response = self
            .client
            .clone()
            .submit_ratings(request)
            .await
            .map_err(|s| {
                let text = format!("{:?}: {}", s.code(), s.message());
                if self.permanent.contains(&s.code()) {
                    SendError::Permanent(text)
                } else {
                    SendError::Retryable(text)
                }
            })?;
        let results = response.into_inner().results;
        if results.len() != ratings.len() {
            return Err(SendError::Malformed(format!(
                "upstream answered {} results for {} ratings",
                results.len(),
                ratings.len()
            )));
        }
        if let Some((i, r)) = results
            .iter()
            .enumerate()
            .find(|(i, r)| r.index as usize != *i)
        {
            return Err(SendError::Malformed(format!(
                "upstream answered result {i} with index {}: results out of order",
                r.index
            )));
        }
        Ok(results
            .into_iter()
            .map(|r| match pb::Outcome::try_from(r.outcome) {
                Ok(pb::Outcome::Accepted | pb::Outcome::Duplicate) => Delivery::Delivered,
                outcome => {
                    let name = outcome.map_or("UNKNOWN", |o| o.as_str_name());
                    let why: Vec<String> = r
                        .violations
                        .iter()
                        .map(|v| format!("{}: {}", v.field, v.description))
                        .collect();
                    Delivery::Rejected(format!("{name} {}", why.join("; ")).trim().to_owned())
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names() {
        assert_eq!(
            code_from_name("INVALID_ARGUMENT"),
            Some(Code::InvalidArgument)
        );
        assert_eq!(code_from_name("unavailable"), Some(Code::Unavailable));
        assert_eq!(code_from_name("NOPE"), None);
    }

    #[test]
    fn relayed_keeps_the_first_origin_and_uses_the_hub_id_as_key() {
        let r = pb::Rating {
            hub_id: "h".into(),
            source_system: "dept".into(),
            source_key: "k".into(),
            feed_sequence: 9,
            ..Default::default()
        };
        let once = relayed(&r);
        assert_eq!(
            (
                once.source_key.as_str(),
                once.origin_source_system.as_str(),
                once.origin_source_key.as_str()
            ),
            ("h", "dept", "k")
        );
        let mut at_province = once.clone();
        at_province.source_system = "city-hub".into();
        let twice = relayed(&at_province);
        assert_eq!(twice.origin_source_system, "dept");
        assert_eq!(twice.feed_sequence, 0);
    }
}
