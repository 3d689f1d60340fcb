//! `AdminService`: operator calls. Every call needs the admin role.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use super::query::{page_token, parse_page_token};
use super::{HubState, bad_request, page_size};
use crate::auth::Role;
use crate::pb::v1 as pb;
use crate::pb::v1::admin_service_server::AdminService;
use crate::time::timestamp_from_micros;

pub struct AdminApi {
    state: Arc<HubState>,
}

impl AdminApi {
    pub fn new(state: Arc<HubState>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn list_pii_access(
        &self,
        request: Request<pb::ListPiiAccessRequest>,
    ) -> Result<Response<pb::ListPiiAccessResponse>, Status> {
        self.state.admit(&request, "ListPiiAccess", Role::Admin)?;
        let req = request.into_inner();
        let size = page_size(req.page_size, 100, 1000)?;
        let fingerprint = hex::encode(&Sha256::digest(req.principal.as_bytes())[..8]);
        let after =
            parse_page_token(&req.page_token, &fingerprint).map_err(|v| bad_request(&[v]))?;
        let principal = (!req.principal.is_empty()).then_some(req.principal.as_str());
        let mut rows = self
            .state
            .store
            .list_pii_access(principal, after, size + 1)
            .await?;
        let more = rows.len() > size as usize;
        rows.truncate(size as usize);
        let next_page_token = match (more, rows.last()) {
            (true, Some(last)) => page_token(last.id, &fingerprint),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListPiiAccessResponse {
            entries: rows
                .into_iter()
                .map(|a| pb::PiiAccess {
                    at: Some(timestamp_from_micros(a.at_micros)),
                    principal: a.principal,
                    rpc: a.rpc,
                    hub_id: a.hub_id.to_string(),
                })
                .collect(),
            next_page_token,
        }))
    }
}
