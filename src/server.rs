//! Starting and stopping the hub: open the store, bind, serve every service, and on shutdown
//! drain in-flight calls and queued commits before the process exits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;

use crate::api::HubState;
use crate::api::ingest::IngestApi;
use crate::api::query::QueryApi;
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::pb::v1::ingest_service_server::IngestServiceServer;
use crate::pb::v1::query_service_server::QueryServiceServer;
use crate::store::{SqliteStore, Store};

/// A hub that is serving. Drop does not stop it: call [`RunningHub::shutdown`].
pub struct RunningHub {
    pub local_addr: SocketAddr,
    store: Arc<dyn Store>,
    stop: Option<oneshot::Sender<()>>,
    serving: JoinHandle<Result<(), tonic::transport::Error>>,
    grace: Duration,
}

/// Opens the store and starts serving on `config.server.listen` (port 0 picks a free port).
pub async fn start(config: &Config) -> anyhow::Result<RunningHub> {
    start_with_clock(config, Arc::new(SystemClock)).await
}

pub async fn start_with_clock(
    config: &Config,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<RunningHub> {
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&config.sqlite_options(), clock.clone())
            .await
            .with_context(|| format!("opening the database {}", config.storage.url))?,
    );
    let listener = TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("binding {}", config.server.listen))?;
    let local_addr = listener.local_addr()?;

    let state = Arc::new(HubState {
        store: store.clone(),
        rules: config.ingest_rules(),
        clock,
        max_batch: config.server.max_batch,
        stream_window: config.server.stream_window,
        plaintext_source_system: config.server.plaintext_source_system.clone(),
    });
    let max_msg = config.server.max_message_bytes;
    let ingest = IngestServiceServer::new(IngestApi::new(state.clone()))
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(max_msg);
    let query = QueryServiceServer::new(QueryApi::new(state.clone()))
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(max_msg);

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<IngestServiceServer<IngestApi>>()
        .await;
    health_reporter
        .set_serving::<QueryServiceServer<QueryApi>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let (stop, stopped) = oneshot::channel::<()>();
    let router = Server::builder()
        .tcp_nodelay(true)
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(ingest)
        .add_service(query);
    let serving = tokio::spawn(router.serve_with_incoming_shutdown(
        TcpListenerStream::new(listener),
        async move {
            let _ = stopped.await;
        },
    ));
    tracing::info!(
        addr = %local_addr,
        database = %config.storage.url,
        synchronous = ?config.storage.synchronous,
        "Listening (plaintext gRPC)."
    );
    Ok(RunningHub {
        local_addr,
        store,
        stop: Some(stop),
        serving,
        grace: Duration::from_secs(config.server.shutdown_grace_secs),
    })
}

impl RunningHub {
    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// Stops accepting calls, lets in-flight calls finish (up to the grace period), commits
    /// everything already queued for the writer, and closes the database.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match tokio::time::timeout(self.grace, &mut self.serving).await {
            Ok(joined) => joined.context("server task")??,
            Err(_) => {
                tracing::warn!(
                    grace_secs = self.grace.as_secs(),
                    "Calls still running after the grace period; cutting them off."
                );
                self.serving.abort();
            }
        }
        self.store.close().await;
        tracing::info!("Stopped; every queued commit finished.");
        Ok(())
    }
}
