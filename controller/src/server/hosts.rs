//! The Hosts service: authenticates the host and hands its stream to
//! [`crate::sessions::run`].

use std::sync::Arc;

use hostmesh_api::proto::hosts_server::Hosts;
use hostmesh_api::proto::{ControllerMessage, HostMessage};
use hostmesh_api::resource::{Kind, Resource, ResourceKey};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::operator::store_status;
use super::require_host;
use crate::app::Shared;

pub struct HostsService {
    shared: Arc<Shared>,
}

impl HostsService {
    pub fn new(shared: Arc<Shared>) -> HostsService {
        HostsService { shared }
    }
}

#[tonic::async_trait]
impl Hosts for HostsService {
    type SessionStream = ReceiverStream<Result<ControllerMessage, Status>>;

    async fn session(
        &self,
        req: Request<Streaming<HostMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let host = require_host(&req, &self.shared.config.trust_domain)?;
        let key = ResourceKey::new(Kind::Workload, host.spiffe_id.namespace(), &host.host_id);
        let workload = match self
            .shared
            .resources
            .get(&key)
            .await
            .map_err(store_status)?
        {
            Some(Resource::Workload(w)) => w,
            _ => {
                return Err(Status::permission_denied(format!(
                    "host {} has been removed from the mesh; join again with a new token",
                    host.host_id
                )));
            }
        };
        if workload.spec.identity != host.spiffe_id.to_string() {
            return Err(Status::permission_denied(format!(
                "host {} is registered as {}, not {}",
                host.host_id, workload.spec.identity, host.spiffe_id
            )));
        }
        let inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(crate::sessions::run(
            self.shared.clone(),
            host,
            workload,
            inbound,
            tx,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
