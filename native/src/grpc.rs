//! The gRPC surface: one hyper service that routes each call by path. Health and reflection
//! are tonic's; ServerLive is answered here (it answers while Python is busy); ModelInfer and ModelStreamInfer
//! are decoded here and handed to Python; every other inference or admin RPC goes to Python
//! as bytes.
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, LazyLock, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Body as HttpBody, Frame};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::body::Body;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::server::Grpc;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::handover::{Failure, Hub, Item, Metadata, Outcome, Reply};
use crate::pb::inference::model_infer_response::InferOutputTensor;
use crate::pb::inference::{
    ModelInferRequest, ModelInferResponse, ModelStreamInferResponse, ServerLiveRequest,
    ServerLiveResponse,
};

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

// -- limits and statuses ---------------------------------------------------------------------

const TONIC_TOO_LARGE: &str = "Error, decoded message length too large: found ";

/// tonic answers a request over the size limit OUT_OF_RANGE; grpcio (and so every client of
/// the gateway) says RESOURCE_EXHAUSTED "SERVER: Received message larger than max (N vs. M)".
pub fn grpcio_size_status(status: &Status) -> Option<Status> {
    if status.code() != Code::OutOfRange {
        return None;
    }
    let rest = status.message().strip_prefix(TONIC_TOO_LARGE)?;
    let (found, rest) = rest.split_once(" bytes, the limit is: ")?;
    let limit = rest.strip_suffix(" bytes")?;
    Some(Status::resource_exhausted(format!(
        "SERVER: Received message larger than max ({found} vs. {limit})"
    )))
}

/// The same mapping on a trailers-only response (a unary request refused before its handler).
fn resource_exhausted(headers: &mut HeaderMap) {
    if headers.get("grpc-status").map(|v| v.as_bytes()) != Some(b"11") {
        return;
    }
    let Some(status) = Status::from_header_map(headers) else {
        return;
    };
    if let Some(mapped) = grpcio_size_status(&status) {
        headers.remove("grpc-message");
        // into_http writes the status headers; take them from there.
        let (parts, _) = mapped.into_http::<Body>().into_parts();
        for name in ["grpc-status", "grpc-message"] {
            if let Some(value) = parts.headers.get(name) {
                headers.insert(name, value.clone());
            }
        }
    }
}

/// A reply of `len` bytes over the limit: RESOURCE_EXHAUSTED, as grpcio says it.
pub fn too_large(len: usize, max: usize) -> Option<Status> {
    (len > max).then(|| {
        Status::resource_exhausted(format!(
            "SERVER: Sent message larger than max ({len} vs. {max})"
        ))
    })
}

fn unauthenticated(metadata: &tonic::metadata::MetadataMap, token: &str) -> Option<Status> {
    let presented = metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            let token = token.trim();
            (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
        });
    match presented {
        None => Some(Status::unauthenticated(
            "this call needs the server's token: send metadata 'authorization: Bearer <token>'",
        )),
        Some(p) if !same(p.as_bytes(), token.as_bytes()) => {
            Some(Status::unauthenticated("the bearer token is not the token"))
        }
        Some(_) => None,
    }
}

/// Constant-time comparison (for the length it reads).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

// -- metadata and deadlines ------------------------------------------------------------------

/// `grpc-timeout` ("<1-8 digits><H|M|S|m|u|n>") as a duration.
pub fn parse_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

const TRANSPORT_KEYS: [&str; 5] = [
    "te",
    "content-type",
    "grpc-timeout",
    "grpc-encoding",
    "grpc-accept-encoding",
];

/// The call's text metadata for Python, and its deadline.
fn call_info(metadata: &tonic::metadata::MetadataMap) -> (Metadata, Option<Instant>) {
    let mut pairs = Vec::with_capacity(4);
    let mut deadline = None;
    for entry in metadata.iter() {
        if let tonic::metadata::KeyAndValueRef::Ascii(key, value) = entry {
            let key = key.as_str();
            if key == "grpc-timeout" {
                deadline = value
                    .to_str()
                    .ok()
                    .and_then(parse_timeout)
                    .map(|d| Instant::now() + d);
            } else if !TRANSPORT_KEYS.contains(&key) {
                if let Ok(value) = value.to_str() {
                    pairs.push((key.to_owned(), value.to_owned()));
                }
            }
        }
    }
    (pairs, deadline)
}

fn seconds_left(deadline: Option<Instant>) -> Option<f64> {
    deadline.map(|d| d.saturating_duration_since(Instant::now()).as_secs_f64())
}

fn deadline_exceeded() -> Status {
    Status::deadline_exceeded("Deadline Exceeded")
}

fn stopped() -> Status {
    Status::unavailable("the server is stopping")
}

/// Waits for `rx` until `deadline`.
async fn outcome(
    rx: tokio::sync::oneshot::Receiver<Outcome>,
    deadline: Option<Instant>,
) -> Result<Outcome, Status> {
    let received = match deadline {
        Some(d) => tokio::time::timeout_at(d, rx)
            .await
            .map_err(|_| deadline_exceeded())?,
        None => rx.await,
    };
    received.map_err(|_| stopped())
}

/// One unary call handed to Python: its reply and trailers, or the status it failed with
/// (its own, DEADLINE_EXCEEDED at the deadline, UNAVAILABLE when the server stops). Dropping
/// the future before the reply (a cancelled call) tells Python through the guard.
async fn unary_reply(
    state: &State,
    deadline: Option<Instant>,
    item: impl FnOnce(u64) -> Item,
) -> Result<(Reply, Metadata), Status> {
    let (guard, rx) = state.hub.submit(item);
    let result = outcome(rx, deadline).await;
    drop(guard);
    match result? {
        Outcome::Reply { message, trailers } => Ok((message, trailers)),
        Outcome::Failed(failure) => Err(failure.status()),
    }
}

/// A reply of `len` bytes within the size limit, or RESOURCE_EXHAUSTED as grpcio says it.
fn sized(len: usize, state: &State) -> Result<(), Status> {
    too_large(len, state.max_message).map_or(Ok(()), Err)
}

/// Trailing metadata a reply carries (response extension, moved into the body's trailers).
#[derive(Clone)]
struct Trailers(Metadata);

fn with_trailers<M>(message: M, trailers: Metadata) -> Response<M> {
    let mut response = Response::new(message);
    response.extensions_mut().insert(Trailers(trailers));
    response
}

// -- the RPCs --------------------------------------------------------------------------------

type Now<T> = std::future::Ready<Result<Response<T>, Status>>;
type Boxed<T> = Pin<Box<dyn Future<Output = Result<Response<T>, Status>> + Send>>;

struct Live(Arc<State>);

impl tower_service::Service<Request<ServerLiveRequest>> for Live {
    type Response = Response<ServerLiveResponse>;
    type Error = Status;
    type Future = Now<ServerLiveResponse>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<ServerLiveRequest>) -> Self::Future {
        std::future::ready(match check_token(&self.0, &req) {
            Some(status) => Err(status),
            None => Ok(Response::new(ServerLiveResponse { live: true })),
        })
    }
}

fn check_token<M>(state: &State, req: &Request<M>) -> Option<Status> {
    let token = state.live_ready_token.read().unwrap();
    token
        .as_deref()
        .and_then(|t| unauthenticated(req.metadata(), t))
}

struct Infer(Arc<State>);

impl tower_service::Service<Request<ModelInferRequest>> for Infer {
    type Response = Response<ModelInferResponse>;
    type Error = Status;
    type Future = Boxed<ModelInferResponse>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<ModelInferRequest>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            let (metadata, deadline) = call_info(req.metadata());
            let request = req.into_inner();
            let (message, trailers) = unary_reply(&state, deadline, |slot| Item::Infer {
                slot,
                stream: 0,
                request,
                metadata,
                timeout: seconds_left(deadline),
            })
            .await?;
            match message {
                Reply::Infer(reply) => {
                    sized(reply.encoded_len(), &state)?;
                    Ok(with_trailers(reply, trailers))
                }
                Reply::Bytes(_) => Err(Status::internal("a ModelInfer result without tensors")),
            }
        })
    }
}

/// `Mode::Echo`: the peers' echo reply, encoded once.
static CANNED: LazyLock<Bytes> = LazyLock::new(|| {
    ModelInferResponse {
        model_name: "mlp".into(),
        model_version: "1".into(),
        outputs: vec![InferOutputTensor {
            name: "output".into(),
            datatype: "FP32".into(),
            shape: vec![1, 10],
            ..Default::default()
        }],
        raw_output_contents: vec![Bytes::from_static(&[0; 40])],
        ..Default::default()
    }
    .encode_to_vec()
    .into()
});

struct Canned;

impl tower_service::Service<Request<Bytes>> for Canned {
    type Response = Response<Bytes>;
    type Error = Status;
    type Future = Now<Bytes>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: Request<Bytes>) -> Self::Future {
        std::future::ready(Ok(Response::new(CANNED.clone())))
    }
}

/// `Mode::Decode`'s reply: each input back as an output of the same name.
fn echoed(request: ModelInferRequest) -> ModelInferResponse {
    let outputs = request
        .inputs
        .into_iter()
        .map(|input| InferOutputTensor {
            name: input.name,
            datatype: input.datatype,
            shape: input.shape,
            ..Default::default()
        })
        .collect();
    ModelInferResponse {
        model_name: request.model_name,
        model_version: request.model_version,
        id: request.id,
        outputs,
        raw_output_contents: request.raw_input_contents,
        ..Default::default()
    }
}

struct Echoed;

impl tower_service::Service<Request<ModelInferRequest>> for Echoed {
    type Response = Response<ModelInferResponse>;
    type Error = Status;
    type Future = Now<ModelInferResponse>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<ModelInferRequest>) -> Self::Future {
        std::future::ready(Ok(Response::new(echoed(req.into_inner()))))
    }
}

struct Cold(Arc<State>, String);

impl tower_service::Service<Request<Bytes>> for Cold {
    type Response = Response<Bytes>;
    type Error = Status;
    type Future = Boxed<Bytes>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let state = self.0.clone();
        let method = std::mem::take(&mut self.1);
        Box::pin(async move {
            let (metadata, deadline) = call_info(req.metadata());
            let payload = req.into_inner();
            let (message, trailers) = unary_reply(&state, deadline, |slot| Item::Cold {
                slot,
                method,
                payload,
                metadata,
                timeout: seconds_left(deadline),
            })
            .await?;
            match message {
                Reply::Bytes(payload) => {
                    sized(payload.len(), &state)?;
                    Ok(with_trailers(payload, trailers))
                }
                Reply::Infer(_) => Err(Status::internal("a cold RPC answered with tensors")),
            }
        })
    }
}

type StreamReply = Result<ModelStreamInferResponse, Status>;

struct StreamInfer(Arc<State>);

impl tower_service::Service<Request<Streaming<ModelInferRequest>>> for StreamInfer {
    type Response = Response<ReceiverStream<StreamReply>>;
    type Error = Status;
    type Future = Boxed<ReceiverStream<StreamReply>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<Streaming<ModelInferRequest>>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            let (metadata, deadline) = call_info(req.metadata());
            let (guard, rx) = state.hub.submit(|slot| Item::Open {
                slot,
                method: format!("{INFERENCE}ModelStreamInfer"),
                metadata: metadata.clone(),
            });
            let result = outcome(rx, deadline).await;
            drop(guard);
            if let Outcome::Failed(failure) = result? {
                return Err(failure.status());
            }
            let (tx, out) = mpsc::channel(STREAM_WINDOW + 1);
            let stream = state.hub.next_id();
            let requests = req.into_inner();
            tokio::spawn(async move {
                state.streams.send_modify(|n| *n += 1);
                let run = run_stream(&state, stream, requests, metadata, deadline, &tx);
                let ended = match deadline {
                    Some(d) => tokio::time::timeout_at(d, run).await.is_ok(),
                    None => {
                        run.await;
                        true
                    }
                };
                if !ended {
                    let _ = tx.send(Err(deadline_exceeded())).await;
                }
                state.streams.send_modify(|n| *n -= 1);
            });
            Ok(Response::new(ReceiverStream::new(out)))
        })
    }
}

/// Serves one ModelStreamInfer stream: hands each request over as it arrives (up to
/// STREAM_WINDOW in flight), sends replies in completion order, ends after the last reply
/// once the client half-closed (or the drain asked streams to end).
async fn run_stream(
    state: &Arc<State>,
    stream: u64,
    mut requests: Streaming<ModelInferRequest>,
    metadata: Metadata,
    deadline: Option<Instant>,
    tx: &mpsc::Sender<StreamReply>,
) {
    let mut in_flight = FuturesUnordered::new();
    let mut draining = state.draining.subscribe();
    let mut reading = !*draining.borrow_and_update();
    loop {
        if !reading && in_flight.is_empty() {
            return;
        }
        tokio::select! {
            _ = tx.closed() => return, // the client went away: in-flight calls are cancelled
            Some((echo, result)) = in_flight.next(), if !in_flight.is_empty() => {
                if tx.send(Ok(stream_reply(echo, result))).await.is_err() {
                    return;
                }
            }
            changed = draining.changed(), if reading => {
                if changed.is_err() || *draining.borrow_and_update() {
                    reading = false;
                }
            }
            message = requests.message(), if reading && in_flight.len() < STREAM_WINDOW => {
                match message {
                    Ok(Some(request)) => {
                        let echo = (request.model_name.clone(), request.model_version.clone(), request.id.clone());
                        let (guard, rx) = state.hub.submit(|slot| Item::Infer {
                            slot,
                            stream,
                            request,
                            metadata: metadata.clone(),
                            timeout: seconds_left(deadline),
                        });
                        in_flight.push(async move {
                            let result = rx.await;
                            drop(guard);
                            (echo, result)
                        });
                    }
                    Ok(None) => reading = false,
                    Err(status) => {
                        let status = grpcio_size_status(&status).unwrap_or(status);
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
            }
        }
    }
}

type Echo = (String, String, String);

fn stream_reply(
    (model_name, model_version, id): Echo,
    result: Result<Outcome, tokio::sync::oneshot::error::RecvError>,
) -> ModelStreamInferResponse {
    let failure = match result {
        Ok(Outcome::Reply {
            message: Reply::Infer(reply),
            ..
        }) => {
            return ModelStreamInferResponse {
                error_message: String::new(),
                infer_response: Some(reply),
            }
        }
        Ok(Outcome::Reply { .. }) => Failure {
            code: Code::Internal as i32,
            name: "INTERNAL".into(),
            message: "a ModelInfer result without tensors".into(),
        },
        Ok(Outcome::Failed(failure)) => failure,
        Err(_) => Failure {
            code: Code::Unavailable as i32,
            name: "UNAVAILABLE".into(),
            message: stopped().message().into(),
        },
    };
    ModelStreamInferResponse {
        error_message: format!("{}: {}", failure.name, failure.message),
        infer_response: Some(ModelInferResponse {
            model_name,
            model_version,
            id,
            ..Default::default()
        }),
    }
}

// -- codecs ----------------------------------------------------------------------------------

/// prost messages, with the reply's whole size reserved before encoding: a MB-sized tensor is
/// then copied into the frame once (tonic's prost encoder grows its buffer by doubling).
pub struct MessageCodec<E, D>(std::marker::PhantomData<fn(E) -> D>);

impl<E, D> Default for MessageCodec<E, D> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

impl<E: Message + Send + 'static, D: Message + Default + Send + 'static> Codec
    for MessageCodec<E, D>
{
    type Encode = E;
    type Decode = D;
    type Encoder = MessageCodec<E, D>;
    type Decoder = MessageCodec<E, D>;
    fn encoder(&mut self) -> Self::Encoder {
        Self::default()
    }
    fn decoder(&mut self) -> Self::Decoder {
        Self::default()
    }
}

impl<E: Message, D> Encoder for MessageCodec<E, D> {
    type Item = E;
    type Error = Status;
    fn encode(&mut self, item: E, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.reserve(item.encoded_len());
        item.encode(dst)
            .map_err(|e| Status::internal(format!("encoding the reply: {e}")))
    }
}

impl<E, D: Message + Default> Decoder for MessageCodec<E, D> {
    type Item = D;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<D>, Status> {
        // As tonic's prost codec: a message that does not parse is INTERNAL.
        D::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

// -- bytes codec for cold RPCs

/// Passes messages through as bytes: the cold RPCs are decoded by the Python servicers.
#[derive(Default, Clone, Copy)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

// -- trailers --------------------------------------------------------------------------------

/// A body that adds `extra` to the trailers of `inner` (the gRPC status trailers).
struct WithTrailers {
    inner: Body,
    extra: Option<Metadata>,
}

impl HttpBody for WithTrailers {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        match frame.into_trailers() {
            Ok(mut trailers) => {
                for (key, value) in self.extra.take().unwrap_or_default() {
                    if let (Ok(k), Ok(v)) = (
                        HeaderName::from_bytes(key.as_bytes()),
                        HeaderValue::from_str(&value),
                    ) {
                        trailers.append(k, v);
                    }
                }
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            Err(frame) => Poll::Ready(Some(Ok(frame))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_timeout("S"), None);
        assert_eq!(parse_timeout("123456789S"), None);
        assert_eq!(parse_timeout("5x"), None);
    }

    #[test]
    fn oversized_requests_are_resource_exhausted_as_grpcio_says() {
        let tonic = Status::out_of_range(
            "Error, decoded message length too large: found 2000 bytes, the limit is: 1024 bytes",
        );
        let mapped = grpcio_size_status(&tonic).unwrap();
        assert_eq!(mapped.code(), Code::ResourceExhausted);
        assert_eq!(
            mapped.message(),
            "SERVER: Received message larger than max (2000 vs. 1024)"
        );
        assert!(grpcio_size_status(&Status::out_of_range("index 3 out of range")).is_none());

        let mut headers = tonic.into_http::<Body>().into_parts().0.headers;
        resource_exhausted(&mut headers);
        let status = Status::from_header_map(&headers).unwrap();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "SERVER: Received message larger than max (2000 vs. 1024)"
        );
    }

    #[test]
    fn oversized_replies() {
        assert!(too_large(10, 10).is_none());
        let status = too_large(11, 10).unwrap();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "SERVER: Sent message larger than max (11 vs. 10)"
        );
    }

    #[test]
    fn tokens() {
        let mut md = tonic::metadata::MetadataMap::new();
        let missing = unauthenticated(&md, "s3cret").unwrap();
        assert_eq!(missing.code(), Code::Unauthenticated);
        assert!(missing.message().contains("authorization: Bearer <token>"));
        md.insert("authorization", "Bearer nope".parse().unwrap());
        assert_eq!(
            unauthenticated(&md, "s3cret").unwrap().message(),
            "the bearer token is not the token"
        );
        md.insert("authorization", "bearer s3cret".parse().unwrap());
        assert!(unauthenticated(&md, "s3cret").is_none());
    }

    #[test]
    fn metadata_for_python_and_the_deadline() {
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert("grpc-timeout", "2S".parse().unwrap());
        md.insert("te", "trailers".parse().unwrap());
        md.insert("x-session", "abc".parse().unwrap());
        md.insert_bin(
            "blob-bin",
            tonic::metadata::MetadataValue::from_bytes(b"\x00"),
        );
        let (pairs, deadline) = call_info(&md);
        assert_eq!(pairs, vec![("x-session".to_owned(), "abc".to_owned())]);
        let left = deadline.unwrap() - Instant::now();
        assert!(left <= Duration::from_secs(2) && left > Duration::from_secs(1));
    }

    #[test]
    fn raw_inputs_are_views_of_the_request_bytes() {
        let request = ModelInferRequest {
            model_name: "m".into(),
            raw_input_contents: vec![Bytes::from(vec![7u8; 4096])],
            ..Default::default()
        };
        let wire = Bytes::from(request.encode_to_vec());
        let decoded = ModelInferRequest::decode(wire.clone()).unwrap();
        let raw = &decoded.raw_input_contents[0];
        let start = wire.as_ptr() as usize;
        assert!((start..start + wire.len()).contains(&(raw.as_ptr() as usize)));
        assert_eq!(raw.len(), 4096);
    }

    #[test]
    fn replies_carry_raw_outputs() {
        let reply = ModelInferResponse {
            model_name: "m".into(),
            raw_output_contents: vec![Bytes::from_static(&[1, 2, 3, 4])],
            ..Default::default()
        };
        let wrapped = stream_reply(
            Default::default(),
            Ok(Outcome::Reply {
                message: Reply::Infer(reply.clone()),
                trailers: vec![],
            }),
        );
        assert_eq!(wrapped.error_message, "");
        let decoded = ModelStreamInferResponse::decode(wrapped.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded.infer_response.unwrap(), reply);
    }

    #[test]
    fn measurement_modes() {
        assert_eq!("echo".parse::<Mode>(), Ok(Mode::Echo));
        assert!("fast".parse::<Mode>().unwrap_err().contains("\"fast\""));
        let state = State::new(Hub::new().unwrap(), 1 << 20);
        assert_eq!(state.mode(), Mode::Gateway);
        state.set_mode(Mode::Decode);
        assert_eq!(state.mode(), Mode::Decode);

        let canned = ModelInferResponse::decode(CANNED.clone()).unwrap();
        assert_eq!(canned.outputs[0].shape, vec![1, 10]);
        assert_eq!(canned.raw_output_contents[0].len(), 40);

        let input = crate::pb::inference::model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![1, 2],
            ..Default::default()
        };
        let reply = echoed(ModelInferRequest {
            model_name: "m".into(),
            id: "r1".into(),
            inputs: vec![input],
            raw_input_contents: vec![Bytes::from_static(&[1; 8])],
            ..Default::default()
        });
        assert_eq!((reply.model_name.as_str(), reply.id.as_str()), ("m", "r1"));
        assert_eq!(reply.outputs[0].name, "x");
        assert_eq!(reply.outputs[0].shape, vec![1, 2]);
        assert_eq!(reply.raw_output_contents, vec![Bytes::from_static(&[1; 8])]);
    }

    #[test]
    fn failed_stream_requests_echo_the_request() {
        let failure = Failure {
            code: 3,
            name: "INVALID_ARGUMENT".into(),
            message: "bad shape".into(),
        };
        let reply = stream_reply(
            ("m".into(), "1".into(), "r7".into()),
            Ok(Outcome::Failed(failure)),
        );
        assert_eq!(reply.error_message, "INVALID_ARGUMENT: bad shape");
        let echoed = reply.infer_response.unwrap();
        assert_eq!(
            (
                echoed.model_name.as_str(),
                echoed.model_version.as_str(),
                echoed.id.as_str()
            ),
            ("m", "1", "r7")
        );
    }
}
