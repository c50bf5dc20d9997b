//! `meshctl`: parses the command line and runs it.

use std::process::ExitCode;

use clap::Parser;
use hostmesh_controller::cli::{Cli, run};

#[allow(clippy::print_stdout)]
fn main() -> ExitCode {
    hostmesh_api::tls::install_default_provider();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("meshctl: error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("meshctl: error: {e}");
            ExitCode::FAILURE
        }
    }
}
