//! ModelStreamInfer: the stream opened with Python, its requests handed over as they arrive,
//! its replies sent in completion order.
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use super::calls::{
    call_info, deadline_exceeded, grpcio_size_status, outcome, seconds_left, stopped,
};
use super::unary::Boxed;
use super::{State, INFERENCE, STREAM_WINDOW};
use crate::handover::{Failure, Item, Metadata, Outcome, Reply};
use crate::pb::inference::{ModelInferRequest, ModelInferResponse, ModelStreamInferResponse};

type StreamReply = Result<ModelStreamInferResponse, Status>;

pub(super) struct StreamInfer(pub(super) Arc<State>);

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
#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use prost::Message;

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
