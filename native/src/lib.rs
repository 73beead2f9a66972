//! tensorgate's native gRPC front end. Rust owns the transport (HTTP/2, TLS, gRPC framing,
//! deadlines, size limits), protobuf decoding and encoding, health and reflection; the
//! gateway's logic stays in Python, reached through the hand-over queue (`handover`).
//! NATIVE_SPEC.md (and `tensorgate_native.pyi`) is the contract with the Python side.

pub mod grpc;
pub mod handover;
pub mod reflection;
pub mod server;
pub mod socket;
pub mod tls;

#[cfg(feature = "python")]
mod python;

/// Messages generated from `protos/` (the admin service's go to Python as bytes: not needed).
pub mod pb {
    pub mod inference {
        tonic::include_proto!("inference");
    }
}
