//! The hand-over between the tokio threads and Python: one queue that Rust fills without the
//! GIL, an eventfd that turns readable when the queue goes from empty to non-empty, and the
//! table of calls waiting for their result (`complete`).
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::pb::inference::ModelInferRequest;

/// Text metadata of a call: lower-case keys, no binary entries.
pub type Metadata = Vec<(String, String)>;

/// What Python receives from `take()`.
#[derive(Debug)]
pub enum Item {
    /// A ModelInfer request (`stream` 0) or a request of ModelStreamInfer stream `stream`.
    Infer {
        slot: u64,
        stream: u64,
        request: ModelInferRequest,
        metadata: Metadata,
        timeout: Option<f64>,
    },
    /// A ModelStreamInfer stream opened: Python accepts (OK) or refuses it (a status).
    Open {
        slot: u64,
        method: String,
        metadata: Metadata,
    },
    /// Any other unary RPC of the inference or admin service, as serialized bytes.
    Cold {
        slot: u64,
        method: String,
        payload: Bytes,
        metadata: Metadata,
        timeout: Option<f64>,
    },
    /// The call of `slot` was cancelled (client, deadline or stop) before its result came.
    Cancel { slot: u64 },
}

/// A gRPC status: code number, its name (`INVALID_ARGUMENT`), message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: i32,
    pub name: String,
    pub message: String,
}

impl Failure {
    pub fn status(&self) -> tonic::Status {
        tonic::Status::new(tonic::Code::from_i32(self.code), self.message.clone())
    }
}

/// What Python hands back for a slot.
#[derive(Debug)]
pub enum Outcome {
    /// An encoded reply message (a ModelInferResponse, or a cold RPC's response) plus trailers.
    Reply {
        message: Reply,
        trailers: Metadata,
    },
    Failed(Failure),
}

#[derive(Debug)]
pub enum Reply {
    Infer(crate::pb::inference::ModelInferResponse),
    Bytes(Bytes),
}

pub struct Hub {
    queue: Mutex<Vec<Item>>,
    eventfd: OwnedFd,
    pending: Mutex<HashMap<u64, oneshot::Sender<Outcome>>>,
    next: AtomicU64,
}

/// Removes its slot from the pending table when dropped; if the result was not in yet, Python
/// is told the call was cancelled.
pub struct Guard {
    hub: Arc<Hub>,
    slot: u64,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let removed = self.hub.pending.lock().unwrap().remove(&self.slot);
        if removed.is_some() {
            self.hub.push(Item::Cancel { slot: self.slot });
        }
    }
}

impl Hub {
    pub fn new() -> std::io::Result<Arc<Self>> {
        // SAFETY: eventfd returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Arc::new(Self {
            queue: Mutex::new(Vec::with_capacity(256)),
            // SAFETY: fd is a fresh descriptor that nothing else owns.
            eventfd: unsafe { OwnedFd::from_raw_fd(fd) },
            pending: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        }))
    }

    pub fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// A fresh id (slots and streams share the counter; never 0).
    pub fn next_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Hands `item` (built for a fresh slot) to Python; the receiver gets the slot's outcome.
    pub fn submit(
        self: &Arc<Self>,
        make: impl FnOnce(u64) -> Item,
    ) -> (Guard, oneshot::Receiver<Outcome>) {
        let slot = self.next_id();
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(slot, tx);
        self.push(make(slot));
        (
            Guard {
                hub: self.clone(),
                slot,
            },
            rx,
        )
    }

    fn push(&self, item: Item) {
        let was_empty = {
            let mut queue = self.queue.lock().unwrap();
            queue.push(item);
            queue.len() == 1
        };
        if was_empty {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to our own eventfd. A full counter
            // (EAGAIN) still leaves it readable, which is all that matters.
            unsafe { libc::write(self.eventfd(), (&one as *const u64).cast(), 8) };
        }
    }

    /// Everything queued since the last take (the eventfd is reset first, so an item pushed
    /// meanwhile makes it readable again).
    pub fn take(&self) -> Vec<Item> {
        let mut count: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64; EAGAIN (nothing to read) is fine.
        unsafe { libc::read(self.eventfd(), (&mut count as *mut u64).cast(), 8) };
        std::mem::take(&mut *self.queue.lock().unwrap())
    }

    /// Delivers `outcome` to the call waiting on `slot`; false when none waits (cancelled,
    /// unknown or already answered).
    pub fn complete(&self, slot: u64, outcome: Outcome) -> bool {
        let waiter = self.pending.lock().unwrap().remove(&slot);
        match waiter {
            Some(tx) => tx.send(outcome).is_ok(),
            None => false,
        }
    }

    /// Ends every call still waiting (its caller sees the server stopping); Python is told
    /// each was cancelled.
    pub fn fail_all(&self) {
        let slots: Vec<u64> = self
            .pending
            .lock()
            .unwrap()
            .drain()
            .map(|(slot, _)| slot)
            .collect();
        for slot in slots {
            self.push(Item::Cancel { slot });
        }
    }

    /// Calls waiting for Python.
    pub fn in_flight(&self) -> usize {
        self.pending.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(fd: RawFd) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

    fn ok() -> Outcome {
        Outcome::Reply {
            message: Reply::Bytes(Bytes::from_static(b"x")),
            trailers: vec![],
        }
    }

    #[test]
    fn eventfd_follows_the_queue() {
        let hub = Hub::new().unwrap();
        assert!(!readable(hub.eventfd()));
        let (_g1, _r1) = hub.submit(|slot| Item::Cancel { slot });
        let (_g2, _r2) = hub.submit(|slot| Item::Cancel { slot });
        assert!(readable(hub.eventfd()));
        assert_eq!(hub.take().len(), 2);
        assert!(!readable(hub.eventfd()));
        assert!(hub.take().is_empty());
    }

    #[test]
    fn results_reach_their_slot_and_late_ones_are_ignored() {
        let hub = Hub::new().unwrap();
        let (guard, mut rx) = hub.submit(|slot| Item::Cancel { slot });
        let slot = match &hub.take()[0] {
            Item::Cancel { slot } => *slot,
            other => panic!("{other:?}"),
        };
        assert!(hub.complete(slot, ok()));
        assert!(matches!(rx.try_recv().unwrap(), Outcome::Reply { .. }));
        assert!(!hub.complete(slot, ok()));
        drop(guard);
        assert!(hub.take().is_empty(), "an answered call is not cancelled");
        assert_eq!(hub.in_flight(), 0);
    }

    #[test]
    fn a_dropped_call_is_cancelled_once() {
        let hub = Hub::new().unwrap();
        let (guard, _rx) = hub.submit(|slot| Item::Cancel { slot });
        let first = hub.take();
        drop(guard);
        let items = hub.take();
        assert_eq!(items.len(), 1);
        match (&first[0], &items[0]) {
            (Item::Cancel { slot: a }, Item::Cancel { slot: b }) => assert_eq!(a, b),
            other => panic!("{other:?}"),
        }
        assert!(!hub.complete(1, ok()));
        assert_eq!(hub.in_flight(), 0);
    }
}
