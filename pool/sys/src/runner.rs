//! Running host tools (`zfs`, and the network's `ip` and `nft`): every
//! call goes through a [`Runner`], with a timeout and its stderr kept in the
//! error. The real one spawns the program; [`FakeRunner`] records the
//! commands and answers from a script.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// A host tool that could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("`{command}` failed (exit {code:?}): {stderr}")]
    Failed { command: String, code: Option<i32>, stderr: String },
    #[error("`{command}` did not finish within {after:?}")]
    Timeout { command: String, after: Duration },
    #[error("cannot run `{command}`: {error}")]
    Spawn { command: String, error: String },
}

pub type RunFuture<'a> = Pin<Box<dyn Future<Output = Result<String, CommandError>> + Send + 'a>>;

/// Runs one command and returns its stdout.
pub trait Runner: Send + Sync + std::fmt::Debug + 'static {
    fn run<'a>(&'a self, program: &'a str, args: &'a [String]) -> RunFuture<'a>;
}

/// The command line as a user would type it, for errors and logs.
pub fn command_line(program: &str, args: &[String]) -> String {
    std::iter::once(program.to_string()).chain(args.iter().cloned()).collect::<Vec<_>>().join(" ")
}

/// Spawns the program; kills it when `timeout` passes.
#[derive(Debug, Clone)]
pub struct ProcessRunner {
    pub timeout: Duration,
}

impl Runner for ProcessRunner {
    fn run<'a>(&'a self, program: &'a str, args: &'a [String]) -> RunFuture<'a> {
        Box::pin(async move {
            let command = command_line(program, args);
            let child = tokio::process::Command::new(program)
                .args(args)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output();
            let out = match tokio::time::timeout(self.timeout, child).await {
                Err(_) => return Err(CommandError::Timeout { command, after: self.timeout }),
                Ok(Err(e)) => return Err(CommandError::Spawn { command, error: e.to_string() }),
                Ok(Ok(out)) => out,
            };
            if out.status.success() {
                Ok(String::from_utf8_lossy(&out.stdout).into_owned())
            } else {
                Err(CommandError::Failed {
                    command,
                    code: out.status.code(),
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                })
            }
        })
    }
}

/// Records every command; answers the first scripted reply whose prefix
/// matches the command line (each reply is used once), else succeeds with
/// empty output.
#[cfg(any(test, feature = "test-util"))]
#[derive(Debug, Default)]
pub struct FakeRunner {
    pub calls: std::sync::Mutex<Vec<String>>,
    script: std::sync::Mutex<Vec<(String, Result<String, String>)>>,
}

#[cfg(any(test, feature = "test-util"))]
impl FakeRunner {
    /// Answer the next command starting with `prefix` with `stdout`.
    pub fn ok(&self, prefix: &str, stdout: &str) -> &Self {
        self.push(prefix, Ok(stdout.to_string()))
    }

    /// Fail the next command starting with `prefix` with `stderr`.
    pub fn fail(&self, prefix: &str, stderr: &str) -> &Self {
        self.push(prefix, Err(stderr.to_string()))
    }

    fn push(&self, prefix: &str, reply: Result<String, String>) -> &Self {
        self.script.lock().unwrap_or_else(|p| p.into_inner()).push((prefix.to_string(), reply));
        self
    }

    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn clear(&self) {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

#[cfg(any(test, feature = "test-util"))]
impl Runner for FakeRunner {
    fn run<'a>(&'a self, program: &'a str, args: &'a [String]) -> RunFuture<'a> {
        let command = command_line(program, args);
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).push(command.clone());
        let mut script = self.script.lock().unwrap_or_else(|p| p.into_inner());
        let reply =
            script.iter().position(|(p, _)| command.starts_with(p.as_str())).map(|i| script.remove(i).1);
        drop(script);
        Box::pin(async move {
            match reply {
                None => Ok(String::new()),
                Some(Ok(out)) => Ok(out),
                Some(Err(stderr)) => Err(CommandError::Failed { command, code: Some(1), stderr }),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failing_command_keeps_its_stderr_and_a_slow_one_times_out() {
        let r = ProcessRunner { timeout: Duration::from_secs(5) };
        let args = vec!["-c".to_string(), "echo out; echo 'it broke' >&2; exit 3".to_string()];
        match r.run("sh", &args).await {
            Err(CommandError::Failed { code: Some(3), stderr, command }) => {
                assert_eq!(stderr, "it broke");
                assert!(command.starts_with("sh -c"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(r.run("echo", &["hi".to_string()]).await.unwrap(), "hi\n");
        let slow = ProcessRunner { timeout: Duration::from_millis(100) };
        assert!(matches!(slow.run("sleep", &["5".to_string()]).await, Err(CommandError::Timeout { .. })));
        assert!(matches!(r.run("/no/such/zfs", &[]).await, Err(CommandError::Spawn { .. })));
    }
}
