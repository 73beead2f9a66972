//! The server: a small tokio runtime, the accept loop on a listening socket Python bound,
//! optional TLS per connection, HTTP/2 by hyper, graceful stop.
use std::os::fd::{FromRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::grpc::{Gateway, State};
use crate::handover::Hub;
use crate::{socket, tls};

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 flow control and framing (see `serve`).
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
const MAX_FRAME: u32 = 256 << 10;
const SEND_BUFFER: usize = 4 << 20;
/// The socket's buffers (`socket`).
const READ_BUFFER: usize = 256 << 10;
const WRITE_BUFFER: usize = 256 << 10;
/// After the last call finished during a stop, how long to wait for late arrivals.
const SETTLE: Duration = Duration::from_millis(50);

pub struct Core {
    pub state: Arc<State>,
    runtime: Option<Runtime>,
    listener: Mutex<Option<std::net::TcpListener>>,
    tls: tls::Slot,
    health: HealthReporter,
    gateway: Gateway,
    stop: watch::Sender<Option<Duration>>,
    done: Arc<(Mutex<bool>, Condvar)>,
}

impl Core {
    /// `fd`: a bound, listening TCP socket; the server owns it from now on.
    pub fn new(
        fd: RawFd,
        max_message: usize,
        tls: Option<Arc<rustls::ServerConfig>>,
        worker_threads: usize,
    ) -> std::io::Result<Self> {
        // SAFETY: the caller hands over ownership of a listening socket.
        let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
        listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(worker_threads.max(1))
            .thread_name("tensorgate-native")
            .enable_all()
            .build()?;
        let state = State::new(Hub::new()?, max_message);
        let (health, _) = tonic_health::server::health_reporter();
        let gateway = Gateway::new(state.clone(), health.clone()).map_err(std::io::Error::other)?;
        Ok(Self {
            state,
            runtime: Some(runtime),
            listener: Mutex::new(Some(listener)),
            tls: Arc::new(RwLock::new(tls)),
            health,
            gateway,
            stop: watch::channel(None).0,
            done: Arc::new((Mutex::new(false), Condvar::new())),
        })
    }

    fn runtime(&self) -> &Runtime {
        self.runtime.as_ref().expect("runtime present until drop")
    }

    /// Serves on the listener (once; later calls do nothing).
    pub fn start(&self) -> std::io::Result<()> {
        let Some(listener) = self.listener.lock().unwrap().take() else {
            return Ok(());
        };
        let listener = {
            let _entered = self.runtime().enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let serve = serve(
            listener,
            self.gateway.clone(),
            self.tls.clone(),
            self.stop.subscribe(),
            self.state.clone(),
        );
        let done = self.done.clone();
        self.runtime().spawn(async move {
            serve.await;
            let (flag, cv) = &*done;
            *flag.lock().unwrap() = true;
            cv.notify_all();
        });
        Ok(())
    }

    pub fn set_health(&self, service: &str, status: i32) {
        let status = match status {
            1 => ServingStatus::Serving,
            2 => ServingStatus::NotServing,
            _ => ServingStatus::Unknown,
        };
        let health = self.health.clone();
        let service = service.to_owned();
        self.runtime()
            .block_on(async move { health.set_service_status(service, status).await });
    }

    pub fn reload_tls(&self, config: Arc<rustls::ServerConfig>) {
        *self.tls.write().unwrap() = Some(config);
    }

    pub fn end_streams(&self) {
        self.state.draining.send_replace(true);
    }

    /// Starts the graceful stop; returns at once (`wait` blocks until it is over).
    pub fn stop(&self, grace: Duration) {
        if self.listener.lock().unwrap().take().is_some() {
            // never started: nothing to drain
            let (flag, cv) = &*self.done;
            *flag.lock().unwrap() = true;
            cv.notify_all();
        }
        self.stop.send_replace(Some(grace));
    }

    /// Blocks until the server stopped; calls still waiting for Python then end UNAVAILABLE
    /// (and Python gets their cancellation).
    pub fn wait(&self) {
        let (flag, cv) = &*self.done;
        let mut stopped = flag.lock().unwrap();
        while !*stopped {
            stopped = cv.wait(stopped).unwrap();
        }
        drop(stopped);
        self.state.hub.fail_all();
    }

    pub fn is_stopped(&self) -> bool {
        *self.done.0.lock().unwrap()
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

async fn serve(
    listener: tokio::net::TcpListener,
    gateway: Gateway,
    tls: tls::Slot,
    mut stop: watch::Receiver<Option<Duration>>,
    state: Arc<State>,
) {
    let graceful = GracefulShutdown::new();
    let grace = loop {
        if let Some(grace) = *stop.borrow_and_update() {
            break grace;
        }
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    let _ = tcp.set_nodelay(true);
                    let tcp = socket::Buffered::new(tcp, READ_BUFFER, WRITE_BUFFER);
                    let watcher = graceful.watcher();
                    let service = TowerToHyperService::new(gateway.clone());
                    let tls = tls.read().unwrap().clone();
                    tokio::spawn(async move {
                        let mut http = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                        // Windows and frames for MB-sized tensors: hyper's adaptive window
                        // starts at 64 KiB, and 16 KiB frames cost a frame header and a
                        // window update each.
                        http.timer(TokioTimer::new())
                            .initial_stream_window_size(STREAM_WINDOW)
                            .initial_connection_window_size(CONNECTION_WINDOW)
                            .max_frame_size(MAX_FRAME)
                            .max_send_buf_size(SEND_BUFFER);
                        match tls {
                            None => {
                                let conn = http.serve_connection(TokioIo::new(tcp), service);
                                let _ = watcher.watch(conn).await;
                            }
                            Some(config) => {
                                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                                if let Ok(Ok(stream)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                                    let conn = http.serve_connection(TokioIo::new(stream), service);
                                    let _ = watcher.watch(conn).await;
                                }
                            }
                        }
                    });
                }
                // e.g. EMFILE: back off a little instead of spinning
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            changed = stop.changed() => if changed.is_err() { break Duration::ZERO },
        }
    };
    drop(listener); // the port closes: new connections are refused
    let connections_closed = graceful.shutdown(); // GOAWAY on every connection
    let idle = async {
        // Open health Watch streams keep connections up; what matters is the gateway's calls.
        loop {
            if state.hub.in_flight() == 0 && *state.streams.borrow() == 0 {
                tokio::time::sleep(SETTLE).await;
                if state.hub.in_flight() == 0 && *state.streams.borrow() == 0 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::select! {
        _ = connections_closed => {}
        _ = idle => {}
        _ = tokio::time::sleep(grace) => {}
    }
}
