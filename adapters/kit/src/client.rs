//! The hub's generated client over mTLS, from an adapter's `[hub]` config section.

use std::time::Duration;

use serde::Deserialize;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use rating_hub::pb::v1::ingest_service_client::IngestServiceClient;
use rating_hub::pb::v1::sync_service_client::SyncServiceClient;

/// `[hub]`: where the hub is and who this adapter is (its certificate's CN is its principal).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubConnection {
    /// `https://hub.example.gov.cn:50051`.
    pub endpoint: String,
    /// The CA the hub's server certificate chains to.
    pub ca: String,
    /// This adapter's client certificate and key.
    pub cert: String,
    pub key: String,
    /// Name to verify the hub's certificate against, when it differs from the endpoint host.
    #[serde(default)]
    pub domain: String,
    /// Per-call timeout in milliseconds.
    #[serde(default = "d_timeout")]
    pub timeout_ms: u64,
}

fn d_timeout() -> u64 {
    10_000
}

impl HubConnection {
    /// A lazily connecting channel: the adapter starts (and spools) with the hub down.
    pub fn channel(&self) -> anyhow::Result<Channel> {
        let read = |p: &str| std::fs::read(p).map_err(|e| anyhow::anyhow!("hub TLS file {p}: {e}"));
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&self.ca)?))
            .identity(Identity::from_pem(read(&self.cert)?, read(&self.key)?));
        if !self.domain.is_empty() {
            tls = tls.domain_name(self.domain.clone());
        }
        let timeout = Duration::from_millis(self.timeout_ms);
        Ok(Endpoint::from_shared(self.endpoint.clone())?
            .tls_config(tls)?
            .timeout(timeout)
            .connect_timeout(timeout)
            .connect_lazy())
    }

    pub fn ingest(&self) -> anyhow::Result<IngestServiceClient<Channel>> {
        Ok(IngestServiceClient::new(self.channel()?))
    }

    pub fn sync(&self) -> anyhow::Result<SyncServiceClient<Channel>> {
        Ok(SyncServiceClient::new(self.channel()?))
    }
}
