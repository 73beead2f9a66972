//! The unary RPCs: ServerLive (answered here), ModelInfer (handed to Python, or answered in
//! Rust in the measurement modes) and the cold RPCs (bytes to and from Python).
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use prost::Message;
use tonic::{Request, Response, Status};

use super::calls::{call_info, seconds_left, sized, unary_reply, unauthenticated, with_trailers};
use super::State;
use crate::handover::{Item, Reply};
use crate::pb::inference::model_infer_response::InferOutputTensor;
use crate::pb::inference::{
    ModelInferRequest, ModelInferResponse, ServerLiveRequest, ServerLiveResponse,
};

// -- the RPCs --------------------------------------------------------------------------------

type Now<T> = std::future::Ready<Result<Response<T>, Status>>;
pub(super) type Boxed<T> = Pin<Box<dyn Future<Output = Result<Response<T>, Status>> + Send>>;

pub(super) struct Live(pub(super) Arc<State>);

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

pub(super) struct Infer(pub(super) Arc<State>);

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

pub(super) struct Canned;

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

pub(super) struct Echoed;

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

pub(super) struct Cold(pub(super) Arc<State>, pub(super) String);

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
#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc::Mode;
    use crate::handover::Hub;

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
}
