//! Runs `nft` and `ip`, in meshd's own network namespace or in a named one.
//!
//! The thin I/O shell under the capture module: every argument is passed as
//! its own argv entry (never through a shell), the locale is pinned to `C`
//! so error text can be matched, and every command has a deadline and is
//! killed if it misses it.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::CaptureError;

/// How long any one `nft`/`ip` command may take. They finish in
/// milliseconds; a hung one must not hang meshd's start or stop.
pub(crate) const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

/// Where the `nft` and `ip` commands run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NetNs {
    /// meshd's own network namespace: the host's, in production.
    #[default]
    Current,
    /// A named namespace (`/run/netns/NAME`, entered with `ip netns exec`):
    /// for tests, and for hosts simulated as namespaces.
    Named(String),
}

impl NetNs {
    fn validate(&self) -> Result<(), CaptureError> {
        let NetNs::Named(name) = self else {
            return Ok(());
        };
        let reason = if name.is_empty() {
            Some("the name is empty")
        } else if name.len() > 64 {
            Some("the name is longer than 64 characters")
        } else if name == "." || name == ".." {
            Some("the name is a path component")
        } else if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            Some("use ASCII letters, digits, '-', '_' or '.'")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(CaptureError::InvalidNetns {
                name: name.clone(),
                reason,
            }),
            None => Ok(()),
        }
    }
}

/// The two programs this module runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tool {
    Nft,
    Ip,
}

impl Tool {
    pub(crate) fn program(self) -> &'static str {
        match self {
            Tool::Nft => "nft",
            Tool::Ip => "ip",
        }
    }

    fn package(self) -> &'static str {
        match self {
            Tool::Nft => "nftables",
            Tool::Ip => "iproute2",
        }
    }

    fn not_found(self) -> CaptureError {
        CaptureError::ToolNotFound {
            tool: self.program(),
            package: self.package(),
        }
    }
}

/// Program and arguments to run `tool args` in `ns` (pure).
pub(crate) fn argv<S: AsRef<str>>(
    ns: &NetNs,
    tool: Tool,
    args: &[S],
) -> (&'static str, Vec<String>) {
    match ns {
        NetNs::Current => (
            tool.program(),
            args.iter().map(|a| a.as_ref().to_string()).collect(),
        ),
        NetNs::Named(name) => {
            let mut full = vec![
                "netns".to_string(),
                "exec".to_string(),
                name.clone(),
                tool.program().to_string(),
            ];
            full.extend(args.iter().map(|a| a.as_ref().to_string()));
            ("ip", full)
        }
    }
}

/// The command line as shown in logs and errors.
pub(crate) fn display(program: &str, args: &[String]) -> String {
    std::iter::once(program)
        .chain(args.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A command that ran to completion (successfully or not).
#[derive(Debug)]
pub(crate) struct Finished {
    pub(crate) command: String,
    pub(crate) success: bool,
    pub(crate) status: String,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Finished {
    /// Turns a non-zero exit into [`CaptureError::CommandFailed`] carrying
    /// the command's stderr.
    pub(crate) fn check(self) -> Result<Finished, CaptureError> {
        if self.success {
            Ok(self)
        } else {
            Err(self.into_error())
        }
    }

    pub(crate) fn into_error(self) -> CaptureError {
        CaptureError::CommandFailed {
            command: self.command,
            status: self.status,
            stderr: self.stderr.trim().to_string(),
        }
    }
}

/// `ip netns exec` reports a missing program itself, with this message.
fn netns_exec_missing(tool: Tool, stderr: &str) -> bool {
    stderr.contains(&format!(
        "exec of \"{}\" failed: No such file or directory",
        tool.program()
    ))
}

/// Runs `tool args` in `ns`, feeding `stdin` if given, within
/// [`COMMAND_TIMEOUT`]. A non-zero exit is returned as a [`Finished`], not
/// an error: callers decide what a failure means.
pub(crate) async fn run<S: AsRef<str>>(
    ns: &NetNs,
    tool: Tool,
    args: &[S],
    stdin: Option<&str>,
) -> Result<Finished, CaptureError> {
    ns.validate()?;
    let (program, full_args) = argv(ns, tool, args);
    let command = display(program, &full_args);
    tracing::debug!(%command, "running");

    let mut child = Command::new(program)
        .args(&full_args)
        .env("LC_ALL", "C")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                // In a named namespace the program we spawn is `ip`.
                match ns {
                    NetNs::Current => tool.not_found(),
                    NetNs::Named(_) => Tool::Ip.not_found(),
                }
            } else {
                CaptureError::Io {
                    command: command.clone(),
                    source,
                }
            }
        })?;

    let pipe = child.stdin.take();
    let input = stdin.map(|s| s.as_bytes().to_vec());
    let feed = async move {
        if let (Some(mut pipe), Some(input)) = (pipe, input) {
            pipe.write_all(&input).await?;
            pipe.shutdown().await?;
        }
        Ok::<(), std::io::Error>(())
    };
    // Feed stdin while collecting output, so neither side can block the
    // other; on timeout the child is dropped, and so killed.
    let (fed, output) = tokio::time::timeout(COMMAND_TIMEOUT, async {
        tokio::join!(feed, child.wait_with_output())
    })
    .await
    .map_err(|_| CaptureError::Timeout {
        command: command.clone(),
        timeout: COMMAND_TIMEOUT,
    })?;
    let output = output.map_err(|source| CaptureError::Io {
        command: command.clone(),
        source,
    })?;
    let finished = Finished {
        command: command.clone(),
        success: output.status.success(),
        status: output.status.to_string(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    if !finished.success
        && matches!(ns, NetNs::Named(_))
        && netns_exec_missing(tool, &finished.stderr)
    {
        return Err(tool.not_found());
    }
    // A failed write only matters if the command then claims success (it
    // read a truncated script); a failing command's stderr says more.
    if finished.success {
        fed.map_err(|source| CaptureError::Io { command, source })?;
    }
    Ok(finished)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_run_directly_in_the_current_namespace() {
        let (program, args) = argv(&NetNs::Current, Tool::Nft, &["-f", "-"]);
        assert_eq!(program, "nft");
        assert_eq!(args, vec!["-f", "-"]);
        assert_eq!(display(program, &args), "nft -f -");
    }

    #[test]
    fn commands_run_through_ip_netns_exec_in_a_named_namespace() {
        let (program, args) = argv(&NetNs::Named("hA".into()), Tool::Ip, &["route", "show"]);
        assert_eq!(program, "ip");
        assert_eq!(args, vec!["netns", "exec", "hA", "ip", "route", "show"]);
    }

    #[test]
    fn namespace_names_are_checked() {
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "../etc",
            "a b",
            "a\nb",
            &"n".repeat(65),
        ] {
            let err = NetNs::Named(bad.into()).validate().unwrap_err();
            assert!(matches!(err, CaptureError::InvalidNetns { .. }), "{bad:?}");
        }
        for good in ["hA", "hm-cap-1234-a", "ns_1.x"] {
            NetNs::Named(good.into()).validate().unwrap();
        }
        NetNs::Current.validate().unwrap();
    }

    #[test]
    fn a_missing_program_inside_a_namespace_is_recognised() {
        assert!(netns_exec_missing(
            Tool::Nft,
            "exec of \"nft\" failed: No such file or directory\n"
        ));
        assert!(!netns_exec_missing(Tool::Nft, "Error: syntax error"));
    }

    #[test]
    fn errors_name_the_missing_package() {
        assert_eq!(
            Tool::Nft.not_found().to_string(),
            "nft not found: install the nftables package"
        );
        assert_eq!(
            Tool::Ip.not_found().to_string(),
            "ip not found: install the iproute2 package"
        );
    }

    #[test]
    fn a_failed_command_reports_its_stderr() {
        let finished = Finished {
            command: "nft -f -".into(),
            success: false,
            status: "exit status: 1".into(),
            stdout: String::new(),
            stderr: "/dev/stdin:3:1: Error: syntax error\n".into(),
        };
        assert_eq!(
            finished.check().unwrap_err().to_string(),
            "`nft -f -` failed (exit status: 1): /dev/stdin:3:1: Error: syntax error"
        );
    }
}
