//! Baseline A: the same IngestService contract and mTLS, storing nothing.

use super::*;

// ---------------------------------------------------------------- baseline A (echo server)

pub(crate) struct Echo {
    pub(crate) seq: AtomicU64,
}

pub(crate) type Acks = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<pb::StreamRatingsResponse, Status>> + Send>,
>;

pub(crate) fn accepted(index: usize, r: &pb::Rating, seq: u64) -> pb::ItemResult {
    pb::ItemResult {
        index: index as u32,
        source_key: r.source_key.clone(),
        outcome: pb::Outcome::Accepted as i32,
        hub_id: uuid::Uuid::now_v7().to_string(),
        feed_sequence: seq,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl IngestService for Echo {
    async fn report_tree_head(
        &self,
        _request: tonic::Request<pb::ReportTreeHeadRequest>,
    ) -> Result<tonic::Response<pb::ReportTreeHeadResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "the benchmark's upstream takes no log heads",
        ))
    }

    async fn submit_ratings(
        &self,
        req: Request<pb::SubmitRatingsRequest>,
    ) -> Result<Response<pb::SubmitRatingsResponse>, Status> {
        let ratings = req.into_inner().ratings;
        let results = ratings
            .iter()
            .enumerate()
            .map(|(i, r)| accepted(i, r, self.seq.fetch_add(1, Ordering::Relaxed) + 1))
            .collect();
        Ok(Response::new(pb::SubmitRatingsResponse { results }))
    }

    type StreamRatingsStream = Acks;

    async fn stream_ratings(
        &self,
        req: Request<tonic::Streaming<pb::StreamRatingsRequest>>,
    ) -> Result<Response<Acks>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(async move {
            let mut i = 0usize;
            while let Some(Ok(m)) = inbound.next().await {
                let r = m.rating.unwrap_or_default();
                i += 1;
                if tx
                    .send(Ok(pb::StreamRatingsResponse {
                        result: Some(accepted(i - 1, &r, i as u64)),
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn report_service_cases(
        &self,
        _: Request<pb::ReportServiceCasesRequest>,
    ) -> Result<Response<pb::ReportServiceCasesResponse>, Status> {
        Err(Status::unimplemented("echo baseline"))
    }
}

pub(crate) async fn echo(pki: &Path) -> anyhow::Result<()> {
    let read = |f: &str| std::fs::read(pki.join(f));
    let tls = ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(
            read("server.pem")?,
            read("server.key")?,
        ))
        .client_ca_root(Certificate::from_pem(read("ca.pem")?));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    eprintln!("addr={}", listener.local_addr()?);
    Server::builder()
        .tls_config(tls)?
        .add_service(IngestServiceServer::new(Echo {
            seq: AtomicU64::new(0),
        }))
        // TCP_NODELAY like the hub's listener (`tcp_nodelay` on the builder does not apply
        // to a listener passed in).
        .serve_with_incoming(nodelay(listener))
        .await?;
    Ok(())
}

/// Accepted connections with TCP_NODELAY. With Nagle's algorithm on, a server's small HTTP/2
/// answer can wait for the peer's delayed ACK (40 ms on Linux): that was the relay delay's
/// p99 until the sink set it.
pub(crate) fn nodelay(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}
