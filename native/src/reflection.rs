//! Server reflection (v1 and v1alpha) over the descriptor sets the server was built with.
//!
//! Not tonic-reflection's service: that one ends the whole stream with a status for an
//! unknown symbol, where the protocol (and grpcio, the other front end) answers an
//! `error_response` and the stream goes on. Only its generated messages are used here.
//! A method's full name (`inference.GRPCInferenceService.ModelInfer`) resolves to its
//! service's file: ghz asks for it (server/reflection.py has the same rule for grpcio).
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use prost::Message;
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorSet};

/// Files by name (encoded), the file of each symbol, the services.
#[derive(Default)]
pub struct Symbols {
    files: HashMap<String, (Vec<u8>, Vec<String>)>,
    symbols: HashMap<String, String>,
    services: Vec<String>,
}

fn join(scope: &str, name: &str) -> String {
    if scope.is_empty() {
        name.to_owned()
    } else {
        format!("{scope}.{name}")
    }
}

impl Symbols {
    pub fn new(sets: &[&[u8]]) -> Result<Arc<Self>, prost::DecodeError> {
        let mut this = Self::default();
        for set in sets {
            for file in FileDescriptorSet::decode(*set)?.file {
                let name = file.name().to_owned();
                if this.files.contains_key(&name) {
                    continue;
                }
                let package = file.package().to_owned();
                let mut add = |symbol: String| {
                    this.symbols.insert(symbol, name.clone());
                };
                for message in &file.message_type {
                    messages(&package, message, &mut add);
                }
                for e in &file.enum_type {
                    enums(&package, e, &mut add);
                }
                for service in &file.service {
                    let full = join(&package, service.name());
                    for method in &service.method {
                        add(join(&full, method.name()));
                    }
                    add(full.clone());
                    this.services.push(full);
                }
                this.files
                    .insert(name, (file.encode_to_vec(), file.dependency.clone()));
            }
        }
        this.services.sort();
        Ok(Arc::new(this))
    }

    pub fn services(&self) -> &[String] {
        &self.services
    }

    /// The file named `name` and the files it depends on, transitively (each once).
    pub fn file_with_dependencies(&self, name: &str) -> Option<Vec<Vec<u8>>> {
        self.files.get(name)?;
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let mut todo = vec![name.to_owned()];
        while let Some(next) = todo.pop() {
            if !seen.insert(next.clone()) {
                continue;
            }
            if let Some((encoded, deps)) = self.files.get(&next) {
                out.push(encoded.clone());
                todo.extend(deps.iter().cloned());
            }
        }
        Some(out)
    }

    pub fn file_containing(&self, symbol: &str) -> Option<Vec<Vec<u8>>> {
        self.file_with_dependencies(self.symbols.get(symbol)?)
    }
}

fn messages(scope: &str, message: &DescriptorProto, add: &mut impl FnMut(String)) {
    let full = join(scope, message.name());
    for nested in &message.nested_type {
        messages(&full, nested, add);
    }
    for e in &message.enum_type {
        enums(&full, e, add);
    }
    add(full);
}

fn enums(scope: &str, e: &EnumDescriptorProto, add: &mut impl FnMut(String)) {
    add(join(scope, e.name()));
}

/// One reflection version's service (the two have the same messages in two packages).
macro_rules! reflection_service {
    ($version:ident) => {
        pub mod $version {
            use std::sync::Arc;

            use tokio::sync::mpsc;
            use tokio_stream::wrappers::ReceiverStream;
            use tonic::{Request, Response, Status, Streaming};
            use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
            use tonic_reflection::pb::$version::server_reflection_server::{
                ServerReflection, ServerReflectionServer,
            };
            use tonic_reflection::pb::$version::{
                ErrorResponse, ExtensionNumberResponse, FileDescriptorResponse,
                ListServiceResponse, ServerReflectionRequest, ServerReflectionResponse,
                ServiceResponse,
            };

            use super::Symbols;

            pub struct Reflection(pub Arc<Symbols>);

            pub fn server(symbols: Arc<Symbols>) -> ServerReflectionServer<Reflection> {
                ServerReflectionServer::new(Reflection(symbols))
            }

            fn not_found(what: String) -> MessageResponse {
                MessageResponse::ErrorResponse(ErrorResponse {
                    error_code: tonic::Code::NotFound as i32,
                    error_message: what,
                })
            }

            fn files(
                found: Option<Vec<Vec<u8>>>,
                what: impl FnOnce() -> String,
            ) -> MessageResponse {
                match found {
                    Some(file_descriptor_proto) => {
                        MessageResponse::FileDescriptorResponse(FileDescriptorResponse {
                            file_descriptor_proto,
                        })
                    }
                    None => not_found(what()),
                }
            }

            pub fn answer(
                symbols: &Symbols,
                request: ServerReflectionRequest,
            ) -> ServerReflectionResponse {
                let response = match request.message_request.clone() {
                    Some(MessageRequest::FileByFilename(name)) => {
                        files(symbols.file_with_dependencies(&name), || {
                            format!("file '{name}' not found")
                        })
                    }
                    Some(MessageRequest::FileContainingSymbol(symbol)) => {
                        files(symbols.file_containing(&symbol), || {
                            format!("symbol '{symbol}' not found")
                        })
                    }
                    Some(MessageRequest::FileContainingExtension(_)) => {
                        not_found("extensions are not supported".into())
                    }
                    Some(MessageRequest::AllExtensionNumbersOfType(base_type_name)) => {
                        MessageResponse::AllExtensionNumbersResponse(ExtensionNumberResponse {
                            base_type_name,
                            extension_number: vec![],
                        })
                    }
                    Some(MessageRequest::ListServices(_)) => {
                        MessageResponse::ListServicesResponse(ListServiceResponse {
                            service: symbols
                                .services()
                                .iter()
                                .map(|name| ServiceResponse { name: name.clone() })
                                .collect(),
                        })
                    }
                    None => MessageResponse::ErrorResponse(ErrorResponse {
                        error_code: tonic::Code::InvalidArgument as i32,
                        error_message: "the request names no message_request".into(),
                    }),
                };
                ServerReflectionResponse {
                    valid_host: request.host.clone(),
                    original_request: Some(request),
                    message_response: Some(response),
                }
            }

            #[tonic::async_trait]
            impl ServerReflection for Reflection {
                type ServerReflectionInfoStream =
                    ReceiverStream<Result<ServerReflectionResponse, Status>>;

                async fn server_reflection_info(
                    &self,
                    request: Request<Streaming<ServerReflectionRequest>>,
                ) -> Result<Response<Self::ServerReflectionInfoStream>, Status> {
                    let mut requests = request.into_inner();
                    let (tx, rx) = mpsc::channel(4);
                    let symbols = self.0.clone();
                    tokio::spawn(async move {
                        loop {
                            match requests.message().await {
                                Ok(Some(request)) => {
                                    if tx.send(Ok(answer(&symbols, request))).await.is_err() {
                                        return;
                                    }
                                }
                                Ok(None) => return,
                                Err(status) => {
                                    let _ = tx.send(Err(status)).await;
                                    return;
                                }
                            }
                        }
                    });
                    Ok(Response::new(ReceiverStream::new(rx)))
                }
            }
        }
    };
}

reflection_service!(v1);
reflection_service!(v1alpha);

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    fn symbols() -> Arc<Symbols> {
        Symbols::new(&[
            crate::grpc::DESCRIPTORS,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ])
        .unwrap()
    }

    fn ask(request: MessageRequest) -> MessageResponse {
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(request),
        };
        v1::answer(&symbols(), request).message_response.unwrap()
    }

    #[test]
    fn methods_resolve_to_their_service_file_with_its_imports() {
        let MessageResponse::FileDescriptorResponse(found) =
            ask(MessageRequest::FileContainingSymbol(
                "inference.GRPCInferenceService.ModelInfer".into(),
            ))
        else {
            panic!("not found");
        };
        let names: Vec<String> = found
            .file_descriptor_proto
            .iter()
            .map(|f| {
                prost_types::FileDescriptorProto::decode(f.as_slice())
                    .unwrap()
                    .name()
                    .to_owned()
            })
            .collect();
        assert_eq!(names[0], "grpc_service.proto");
        assert!(names.contains(&"model_config.proto".to_owned()));
    }

    #[test]
    fn unknown_symbols_are_answered_not_found_in_the_stream() {
        for symbol in [
            "inference.NoSuchThing",
            "inference.GRPCInferenceService.NoSuchMethod",
        ] {
            match ask(MessageRequest::FileContainingSymbol(symbol.into())) {
                MessageResponse::ErrorResponse(e) => {
                    assert_eq!(e.error_code, tonic::Code::NotFound as i32)
                }
                other => panic!("{symbol}: {other:?}"),
            }
        }
    }

    #[test]
    fn nested_messages_and_services_are_listed() {
        let s = symbols();
        assert!(s
            .file_containing("inference.ModelInferRequest.InferInputTensor")
            .is_some());
        assert!(s.services().contains(&"grpc.health.v1.Health".to_owned()));
        assert!(s
            .services()
            .contains(&"tensorgate.admin.v1.RoutingAdmin".to_owned()));
    }
}
