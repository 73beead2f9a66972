//! The gRPC surface: one hyper service that routes each call by path. Health and reflection
//! are tonic's; ServerLive is answered here (it answers while Python is busy); ModelInfer and ModelStreamInfer
//! are decoded here and handed to Python; every other inference or admin RPC goes to Python
//! as bytes.
//!
//! This file holds the shared state, the routing and the path constants; the calls' helpers
//! (limits, tokens, deadlines, trailers) are in `calls`, the unary RPCs in `unary`,
//! ModelStreamInfer in `stream`, the codecs in `codec`.
mod calls;
mod codec;
mod stream;
mod unary;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Body as HttpBody;
use tokio::sync::watch;
use tonic::body::Body;
use tonic::codec::{Codec, CompressionEncoding};
use tonic::server::Grpc;
use tonic::Status;

use crate::handover::Hub;
pub use calls::{grpcio_size_status, parse_timeout, too_large};
use calls::{resource_exhausted, Trailers, WithTrailers};
pub use codec::{MessageCodec, RawCodec};
use stream::StreamInfer;
use unary::{Canned, Cold, Echoed, Infer, Live};

pub const INFERENCE: &str = "/inference.GRPCInferenceService/";
pub const ADMIN: &str = "/tensorgate.admin.v1.RoutingAdmin/";
const HEALTH: &str = "/grpc.health.v1.Health/";
const REFLECTION_V1: &str = "/grpc.reflection.v1.ServerReflection/";
const REFLECTION_V1ALPHA: &str = "/grpc.reflection.v1alpha.ServerReflection/";
/// Requests of one ModelStreamInfer stream in Python at once; reading waits beyond.
pub const STREAM_WINDOW: usize = 128;
/// The descriptors of `protos/` (with imports), for reflection.
pub const DESCRIPTORS: &[u8] = tonic::include_file_descriptor_set!("descriptor");

/// What Python configures at run time, shared by every call.
pub struct State {
    pub hub: Arc<Hub>,
    pub max_message: usize,
    /// The inference token ServerLive needs (None: open).
    pub live_ready_token: RwLock<Option<String>>,
    /// True once the drain asked open streams to end.
    pub draining: watch::Sender<bool>,
    pub streams: watch::Sender<usize>,
    /// A `Mode`: what ModelInfer does (measurements only).
    mode: AtomicU8,
}

impl State {
    pub fn new(hub: Arc<Hub>, max_message: usize) -> Arc<Self> {
        Arc::new(Self {
            hub,
            max_message,
            live_ready_token: RwLock::new(None),
            draining: watch::channel(false).0,
            streams: watch::channel(0).0,
            mode: AtomicU8::new(Mode::Gateway as u8),
        })
    }

    pub fn set_mode(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::Relaxed);
    }

    pub fn mode(&self) -> Mode {
        match self.mode.load(Ordering::Relaxed) {
            1 => Mode::Echo,
            2 => Mode::Decode,
            _ => Mode::Gateway,
        }
    }
}

/// What ModelInfer does. For measurements only (`loadtest/account.py`'s native rungs): the
/// other modes leave Python out of ModelInfer; every other RPC is served as always.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Handed over to Python (the server).
    Gateway = 0,
    /// A canned reply (the MLP's: "output" FP32 [1,10]); the request is not decoded.
    Echo = 1,
    /// The request decoded by prost; the reply, built and encoded in Rust, echoes each
    /// input as an output of the same name (raw contents shared, not copied).
    Decode = 2,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "gateway" => Ok(Mode::Gateway),
            "echo" => Ok(Mode::Echo),
            "decode" => Ok(Mode::Decode),
            _ => Err(format!(
                "mode is \"gateway\", \"echo\" or \"decode\", not {s:?}"
            )),
        }
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = http::Response<Body>> + Send>>;
type Handler = Arc<dyn Fn(http::Request<Body>) -> BoxFuture + Send + Sync>;

/// The service every connection serves (cheap to clone).
#[derive(Clone)]
pub struct Gateway {
    state: Arc<State>,
    health: Handler,
    reflection_v1: Handler,
    reflection_v1alpha: Handler,
}

fn handler<S>(service: S) -> Handler
where
    S: tower_service::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
        > + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    Arc::new(move |req| {
        let mut service = service.clone();
        Box::pin(async move {
            match service.call(req).await {
                Ok(response) => response,
                Err(never) => match never {},
            }
        })
    })
}

impl Gateway {
    pub fn new(
        state: Arc<State>,
        health: tonic_health::server::HealthReporter,
    ) -> Result<Self, prost::DecodeError> {
        let health = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(health),
        );
        // Both reflection versions list (and describe) both, as the grpcio front end does.
        let symbols = crate::reflection::Symbols::new(&[
            DESCRIPTORS,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ])?;
        Ok(Self {
            state,
            health: handler(health),
            reflection_v1: handler(crate::reflection::v1::server(symbols.clone())),
            reflection_v1alpha: handler(crate::reflection::v1alpha::server(symbols)),
        })
    }

    fn route(&self, req: http::Request<Body>) -> BoxFuture {
        let path = req.uri().path();
        if path.starts_with(INFERENCE) || path.starts_with(ADMIN) {
            let state = self.state.clone();
            return Box::pin(async move { serve_gateway(state, req).await });
        }
        if path.starts_with(HEALTH) {
            return (self.health)(req);
        }
        if path.starts_with(REFLECTION_V1) {
            return (self.reflection_v1)(req);
        }
        if path.starts_with(REFLECTION_V1ALPHA) {
            return (self.reflection_v1alpha)(req);
        }
        let status = Status::unimplemented("Method not found!"); // as grpcio words it
        Box::pin(async move { status.into_http() })
    }
}

impl<B> tower_service::Service<http::Request<B>> for Gateway
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let fut = self.route(req.map(Body::new));
        Box::pin(async move { Ok(fut.await) })
    }
}

fn grpc<C: Codec>(codec: C, state: &State) -> Grpc<C> {
    Grpc::new(codec)
        .accept_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(state.max_message)
        .max_encoding_message_size(usize::MAX) // checked before encoding: see `too_large`
}

async fn serve_gateway(state: Arc<State>, req: http::Request<Body>) -> http::Response<Body> {
    let method = req.uri().path().to_owned();
    let mut response = match method.strip_prefix(INFERENCE) {
        Some("ModelInfer") => match state.mode() {
            Mode::Gateway => {
                grpc(MessageCodec::default(), &state)
                    .unary(Infer(state.clone()), req)
                    .await
            }
            Mode::Echo => grpc(RawCodec, &state).unary(Canned, req).await,
            Mode::Decode => {
                grpc(tonic_prost::ProstCodec::default(), &state)
                    .unary(Echoed, req)
                    .await
            }
        },
        Some("ModelStreamInfer") => {
            grpc(MessageCodec::default(), &state)
                .streaming(StreamInfer(state.clone()), req)
                .await
        }
        Some("ServerLive") => {
            grpc(tonic_prost::ProstCodec::default(), &state)
                .unary(Live(state.clone()), req)
                .await
        }
        _ => {
            grpc(RawCodec, &state)
                .unary(Cold(state.clone(), method), req)
                .await
        }
    };
    resource_exhausted(response.headers_mut());
    match response.extensions_mut().remove::<Trailers>() {
        Some(trailers) if !trailers.0.is_empty() => response.map(|body| {
            Body::new(WithTrailers {
                inner: body,
                extra: Some(trailers.0),
            })
        }),
        _ => response,
    }
}
