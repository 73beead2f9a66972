//! The codecs: prost messages with the reply's size reserved before encoding (`MessageCodec`)
//! and bytes passed through for the cold RPCs (`RawCodec`).
use bytes::{Buf, BufMut, Bytes};
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

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
#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::inference::ModelInferRequest;

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
}
