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

/// Rust's allocations go to mimalloc, not the C library's malloc. The transport thread
/// allocates what Python's thread frees (decoded requests, read without a copy) and the
/// reverse (encoded replies): with glibc both threads then take the same arena's lock, and
/// under load they wait on it (futex) many times per tick. mimalloc frees another thread's
/// blocks without a lock.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Messages generated from `protos/` (the admin service's go to Python as bytes: not needed).
pub mod pb {
    pub mod inference {
        tonic::include_proto!("inference");
    }
}
