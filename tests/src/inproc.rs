//! The in-process tier: a controller started in this process (ports 0, the
//! embedded store in a temp dir, an injectable clock), an admin client
//! with the credential it wrote, and meshd's own join code for hosts.

use std::path::Path;

use hostmesh_api::clock::SharedClock;
use hostmesh_api::proto::{self, operator_client::OperatorClient};
use hostmesh_controller::app::Controller;
use hostmesh_controller::config::ControllerConfig;
use hostmesh_meshd::identity::Identity;
use hostmesh_meshd::identity::join::{JoinArgs, JoinOutcome, join};
use hostmesh_meshd::identity::store::StateDir;
use tonic::transport::Channel;

pub struct Mesh {
    pub ctl: Controller,
    pub admin: OperatorClient<Channel>,
    pub url: String,
    pub dir: tempfile::TempDir,
}

/// A controller with `resources` applied; `tweak` adjusts its config.
pub async fn mesh_with(
    clock: SharedClock,
    resources: &str,
    tweak: impl FnOnce(&mut ControllerConfig),
) -> Mesh {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = ControllerConfig {
        store: format!("embedded:{}", dir.path().join("state.redb").display()),
        listen: "127.0.0.1:0".parse().expect("addr"),
        metrics_listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.path().join("ctl"),
        ..ControllerConfig::default()
    };
    tweak(&mut config);
    let ctl = Controller::start(config, clock)
        .await
        .expect("starting the controller");
    ctl.wait_ready().await;
    let (channel, url) =
        hostmesh_controller::cli::client::admin_channel(&dir.path().join("ctl/admin.conf"), None)
            .expect("the admin credential");
    let mut admin = OperatorClient::new(channel);
    let docs = hostmesh_api::document::parse_documents(resources).expect("test resources");
    admin
        .apply(hostmesh_api::document::apply_request(&docs, false))
        .await
        .expect("applying the test resources");
    Mesh {
        ctl,
        admin,
        url,
        dir,
    }
}

impl Mesh {
    pub async fn token(
        &mut self,
        group: &str,
        uses: u32,
        ttl_s: u64,
    ) -> proto::CreateTokenResponse {
        self.admin
            .create_token(proto::CreateTokenRequest {
                group: group.into(),
                ttl_seconds: ttl_s,
                uses,
                description: "test".into(),
            })
            .await
            .expect("creating a token")
            .into_inner()
    }

    /// Every join token, as `meshctl token list` sees them.
    pub async fn tokens(&mut self) -> proto::ListTokensResponse {
        self.admin
            .list_tokens(proto::ListTokensRequest {})
            .await
            .expect("listing tokens")
            .into_inner()
    }

    pub fn join_args(&self, token: &str, pin: &str, state: &Path) -> JoinArgs {
        JoinArgs {
            controller: self.url.clone(),
            token: token.to_string(),
            ca_pin: pin.to_string(),
            force: false,
            hostname: "host-under-test".into(),
            state: StateDir::new(state, None),
        }
    }

    /// A host joined to `group` with its state in `state`, loaded as meshd
    /// loads it.
    pub async fn joined_host(&mut self, group: &str, state: &Path) -> std::sync::Arc<Identity> {
        let t = self.token(group, 1, 600).await;
        let now = hostmesh_api::clock::unix_seconds(std::time::SystemTime::now());
        let outcome = join(self.join_args(&t.token, &t.ca_hash, state), now)
            .await
            .expect("joining");
        assert!(matches!(outcome, JoinOutcome::Joined(_)));
        load_identity(state)
    }
}

/// The identity `meshd join` stored in `state`, loaded as meshd loads it
/// (the system clock, the controller it joined).
pub fn load_identity(state: &Path) -> std::sync::Arc<Identity> {
    Identity::load(
        StateDir::new(state, None),
        hostmesh_api::clock::system(),
        None,
        None,
    )
    .expect("loading the joined identity")
}
