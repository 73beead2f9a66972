//! Per-call helpers: size limits and the RESOURCE_EXHAUSTED statuses as grpcio words them,
//! the bearer-token check, `grpc-timeout` and the call's metadata, deadlines, waiting for
//! Python's outcome, and the trailers a reply carries.
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Body as HttpBody, Frame};
use tokio::time::Instant;
use tonic::body::Body;
use tonic::{Code, Response, Status};

use super::State;
use crate::handover::{Item, Metadata, Outcome, Reply};

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
pub(super) fn resource_exhausted(headers: &mut HeaderMap) {
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

pub(super) fn unauthenticated(
    metadata: &tonic::metadata::MetadataMap,
    token: &str,
) -> Option<Status> {
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
pub(super) fn call_info(metadata: &tonic::metadata::MetadataMap) -> (Metadata, Option<Instant>) {
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

pub(super) fn seconds_left(deadline: Option<Instant>) -> Option<f64> {
    deadline.map(|d| d.saturating_duration_since(Instant::now()).as_secs_f64())
}

pub(super) fn deadline_exceeded() -> Status {
    Status::deadline_exceeded("Deadline Exceeded")
}

pub(super) fn stopped() -> Status {
    Status::unavailable("the server is stopping")
}

/// Waits for `rx` until `deadline`.
pub(super) async fn outcome(
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
pub(super) async fn unary_reply(
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
pub(super) fn sized(len: usize, state: &State) -> Result<(), Status> {
    too_large(len, state.max_message).map_or(Ok(()), Err)
}

/// Trailing metadata a reply carries (response extension, moved into the body's trailers).
#[derive(Clone)]
pub(super) struct Trailers(pub(super) Metadata);

pub(super) fn with_trailers<M>(message: M, trailers: Metadata) -> Response<M> {
    let mut response = Response::new(message);
    response.extensions_mut().insert(Trailers(trailers));
    response
}

// -- trailers --------------------------------------------------------------------------------

/// A body that adds `extra` to the trailers of `inner` (the gRPC status trailers).
pub(super) struct WithTrailers {
    pub(super) inner: Body,
    pub(super) extra: Option<Metadata>,
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
}
