//! The data plane's threads: one current-thread tokio runtime per worker.
//!
//! The first worker is the runtime the accept loops run on (in the daemon,
//! the main thread's); the others each own a thread. An accept loop hands
//! each accepted connection to the workers in turn ([`Workers::dispatch`]),
//! and every task of that connection stays on the worker that took it, as
//! Envoy's workers do: no work stealing, so no cross-thread hand-off of a
//! connection's wake-ups and no contended lock on its h2 stream state.
//! (Measured on one worker: a current-thread runtime costs 20% less CPU per
//! request than tokio's multi-thread scheduler; docs/BENCHMARKS.md.) Tunnel
//! connections to a peer are shared by all workers: a stream opened from
//! one worker on a connection driven by another works, at the cost of one
//! cross-thread wake-up.
//!
//! meshd links no multi-thread scheduler at all, which also keeps libm out
//! of the process (tokio's scheduler statistics are its only `powf`), about
//! 0.5 MiB of resident memory.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::TcpStream;
use tokio::runtime::Handle;

#[derive(Clone)]
pub struct Workers {
    /// `handles[0]` is the runtime the accept loops run on.
    handles: Arc<[Handle]>,
    next: Arc<AtomicUsize>,
}

impl Workers {
    /// `first` runs the accept loops; `others` are further workers.
    pub fn new(first: Handle, others: Vec<Handle>) -> Workers {
        let mut handles = vec![first];
        handles.extend(others);
        Workers {
            handles: handles.into(),
            next: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Which worker takes the next connection (round robin).
    fn pick(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len()
    }

    /// Runs `serve(stream)` on the next worker. Called from an accept loop
    /// (on worker 0): a connection for another worker leaves this runtime's
    /// reactor and joins that worker's.
    pub fn dispatch<F, Fut>(&self, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let i = self.pick();
        if i == 0 {
            tokio::spawn(serve(stream));
            return;
        }
        let std = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "handing a connection to a worker failed");
                return;
            }
        };
        self.handles[i].spawn(async move {
            match TcpStream::from_std(std) {
                Ok(stream) => serve(stream).await,
                Err(e) => tracing::warn!(error = %e, "a worker could not take a connection"),
            }
        });
    }
}

/// Worker threads beyond the first: each runs a current-thread runtime
/// until [`WorkerThreads::stop`].
pub struct WorkerThreads {
    handles: Vec<Handle>,
    stop: Vec<tokio::sync::oneshot::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl WorkerThreads {
    /// Starts `count` workers, each asking for `slice` as its scheduler
    /// slice (zero: the kernel's default; [`crate::sched`]).
    pub fn start(count: usize, slice: std::time::Duration) -> std::io::Result<WorkerThreads> {
        let mut w = WorkerThreads {
            handles: Vec::new(),
            stop: Vec::new(),
            threads: Vec::new(),
        };
        for i in 1..=count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            w.handles.push(runtime.handle().clone());
            w.stop.push(stop);
            w.threads.push(
                std::thread::Builder::new()
                    .name(format!("meshd-data-{i}"))
                    .spawn(move || {
                        match crate::sched::request_slice(slice) {
                            Ok(got) => tracing::debug!(worker = i, slice = %got, "scheduler slice"),
                            Err(e) => tracing::warn!(worker = i, error = %e, "the data worker keeps the kernel's scheduler slice"),
                        }
                        runtime.block_on(async {
                            let _ = stopped.await;
                        });
                    })?,
            );
        }
        Ok(w)
    }

    pub fn handles(&self) -> Vec<Handle> {
        self.handles.clone()
    }

    /// Stops every worker (their tasks are dropped) and waits for them.
    pub fn stop(self) {
        drop(self.stop);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn connections_go_round_robin_and_keep_working_on_their_worker() {
        let threads = WorkerThreads::start(2, std::time::Duration::ZERO).expect("workers");
        let main = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        main.block_on(async {
            let workers = Workers::new(Handle::current(), threads.handles());
            assert_eq!(workers.len(), 3);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
            let accept = {
                let workers = workers.clone();
                tokio::spawn(async move {
                    for _ in 0..6 {
                        let (s, _) = listener.accept().await.expect("accept");
                        let seen = seen_tx.clone();
                        workers.dispatch(s, move |mut s| async move {
                            let name = std::thread::current().name().map(str::to_string);
                            let mut buf = [0u8; 5];
                            s.read_exact(&mut buf).await.expect("read");
                            s.write_all(&buf).await.expect("echo");
                            let _ = seen.send(name);
                        });
                    }
                })
            };
            for i in 0..6u8 {
                let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
                c.write_all(&[i; 5]).await.expect("write");
                let mut back = [0u8; 5];
                c.read_exact(&mut back).await.expect("read back");
                assert_eq!(back, [i; 5]);
            }
            accept.await.expect("accept loop");
            let mut names = Vec::new();
            for _ in 0..6 {
                names.push(seen_rx.recv().await.expect("served"));
            }
            let on = |n: &str| names.iter().filter(|x| x.as_deref() == Some(n)).count();
            assert_eq!(on("meshd-data-1"), 2, "{names:?}");
            assert_eq!(on("meshd-data-2"), 2, "{names:?}");
        });
        threads.stop();
    }
}
