//! The connection's socket, buffered both ways for large messages.
//!
//! h2 reads into a buffer sized for the frame it is parsing (8-16 KiB) and writes every DATA
//! frame with its own `writev` and flush, so a 1 MB request took ~120 `recvfrom` calls and a
//! 1 MB reply ~60 `writev` calls, each a loopback packet and a wake-up of the peer. Here reads
//! take what the socket holds (into a buffer that grows while reads fill it, so an idle or
//! small-message connection keeps a small one), and the DATA frames of one pass over the
//! connection's streams go out together: a flush that follows a large write is put off until
//! h2's next flush that follows none (h2 flushes once more at the end of every pass, and the
//! task is woken so that pass comes). Small writes (headers, small replies) are flushed at
//! once, as before.
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, BufWriter, ReadBuf};

/// The read buffer's first size; it doubles, up to the maximum given, each time a read fills it.
const FIRST_READ: usize = 16 << 10;

/// A write larger than this is a full-size DATA frame (16 KiB is the smallest maximum frame
/// size a peer may set, and h2 writes frames that size when a message is larger) and its
/// header. Small frames are written from h2's buffer of this capacity, so a pass that carries
/// only small messages is flushed at once.
const LARGE_WRITE: usize = 16 << 10;

pub struct Buffered<T> {
    io: BufWriter<T>,
    /// read from the socket, not yet taken: `read[start..end]` (empty until the first read)
    read: Vec<u8>,
    start: usize,
    end: usize,
    read_max: usize,
    /// a large write since the last flush: the flush may wait
    large: bool,
}

impl<T: AsyncRead + AsyncWrite> Buffered<T> {
    /// `read_buffer`: the read buffer's largest size; `write_buffer`: the write buffer's size.
    pub fn new(io: T, read_buffer: usize, write_buffer: usize) -> Self {
        Self {
            io: BufWriter::with_capacity(write_buffer, io),
            read: Vec::new(),
            start: 0,
            end: 0,
            read_max: read_buffer.max(FIRST_READ),
            large: false,
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Buffered<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.start == me.end {
            if me.read.is_empty() {
                me.read.resize(FIRST_READ, 0);
            }
            let mut buf = ReadBuf::new(&mut me.read);
            std::task::ready!(Pin::new(me.io.get_mut()).poll_read(cx, &mut buf))?;
            let n = buf.filled().len();
            (me.start, me.end) = (0, n);
            if n == me.read.len() && n < me.read_max {
                me.read.resize((2 * n).min(me.read_max), 0);
            }
        }
        let n = (me.end - me.start).min(out.remaining());
        out.put_slice(&me.read[me.start..me.start + n]);
        me.start += n;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Buffered<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = std::task::ready!(Pin::new(&mut self.io).poll_write(cx, buf))?;
        self.large |= n > LARGE_WRITE;
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let n = std::task::ready!(Pin::new(&mut self.io).poll_write_vectored(cx, bufs))?;
        self.large |= n > LARGE_WRITE;
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if std::mem::take(&mut self.large) {
            // more DATA frames may follow in this pass; h2's flush at its end writes them all
            cx.waker().wake_by_ref();
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Wake, Waker};

    use tokio::io::DuplexStream;

    use super::*;

    /// A large DATA frame and its header, as h2 writes them.
    const FRAME: usize = (16 << 10) + 9;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The socket, the peer's end of it and a waker that counts its wakes.
    struct Rig {
        socket: Buffered<DuplexStream>,
        peer: DuplexStream,
        wakes: Arc<Count>,
        waker: Waker,
    }

    impl Rig {
        fn new(write_buffer: usize) -> Self {
            let (ours, peer) = tokio::io::duplex(4 << 20);
            let wakes = Arc::new(Count(AtomicUsize::new(0)));
            Self {
                socket: Buffered::new(ours, 64 << 10, write_buffer),
                peer,
                waker: Waker::from(wakes.clone()),
                wakes,
            }
        }

        fn write(&mut self, n: usize) {
            let data = vec![7u8; n];
            let slices = [IoSlice::new(&data[..9]), IoSlice::new(&data[9..])];
            let mut cx = Context::from_waker(&self.waker);
            let written = Pin::new(&mut self.socket).poll_write_vectored(&mut cx, &slices);
            assert!(matches!(written, Poll::Ready(Ok(m)) if m == n));
        }

        fn flush(&mut self) {
            let mut cx = Context::from_waker(&self.waker);
            let flushed = Pin::new(&mut self.socket).poll_flush(&mut cx);
            assert!(matches!(flushed, Poll::Ready(Ok(()))));
        }

        fn shutdown(&mut self) {
            let mut cx = Context::from_waker(&self.waker);
            let done = Pin::new(&mut self.socket).poll_shutdown(&mut cx);
            assert!(matches!(done, Poll::Ready(Ok(()))));
        }

        /// How many bytes the peer can read now.
        fn available(&mut self) -> usize {
            let mut space = vec![0u8; 1 << 20];
            let mut buf = ReadBuf::new(&mut space);
            let mut cx = Context::from_waker(&self.waker);
            match Pin::new(&mut self.peer).poll_read(&mut cx, &mut buf) {
                Poll::Ready(Ok(())) => buf.filled().len(),
                Poll::Ready(Err(e)) => panic!("{e}"),
                Poll::Pending => 0,
            }
        }

        fn wakes(&self) -> usize {
            self.wakes.0.load(Ordering::SeqCst)
        }
    }

    #[test]
    fn reads_take_what_the_socket_holds_in_a_buffer_that_grows_while_reads_fill_it() {
        let mut rig = Rig::new(64 << 10);
        let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut cx = Context::from_waker(&rig.waker);
        let wrote = Pin::new(&mut rig.peer).poll_write(&mut cx, &sent);
        assert!(matches!(wrote, Poll::Ready(Ok(n)) if n == sent.len()));
        let (mut got, mut sizes) = (Vec::new(), Vec::new());
        while got.len() < sent.len() {
            let mut space = [0u8; 8 << 10]; // h2 asks for about this much at a time
            let mut buf = ReadBuf::new(&mut space);
            let read = Pin::new(&mut rig.socket).poll_read(&mut cx, &mut buf);
            assert!(matches!(read, Poll::Ready(Ok(()))));
            got.extend_from_slice(buf.filled());
            sizes.push(rig.socket.read.len());
        }
        assert_eq!(got, sent);
        assert_eq!(sizes[0], 32 << 10); // the first read filled 16 KiB: doubled
        assert_eq!(*sizes.last().unwrap(), 64 << 10); // and no further than the maximum
    }

    #[test]
    fn a_small_write_is_flushed_at_once() {
        let mut rig = Rig::new(256 << 10);
        rig.write(300);
        rig.flush();
        assert_eq!(rig.available(), 300);
        assert_eq!(rig.wakes(), 0);
    }

    #[test]
    fn large_writes_wait_for_the_next_flush_that_follows_none_and_wake_the_task() {
        let mut rig = Rig::new(256 << 10);
        for _ in 0..3 {
            rig.write(FRAME);
            rig.flush(); // put off: the task is woken to come back
            assert_eq!(rig.available(), 0);
        }
        assert_eq!(rig.wakes(), 3);
        rig.flush(); // the pass's last flush: everything goes out
        assert_eq!(rig.available(), 3 * FRAME);
    }

    #[test]
    fn a_full_buffer_goes_out_without_a_flush_and_shutdown_writes_the_rest() {
        let mut rig = Rig::new(64 << 10);
        for _ in 0..5 {
            rig.write(FRAME);
        }
        assert_eq!(rig.available(), 3 * FRAME); // the 4th did not fit
        rig.shutdown();
        assert_eq!(rig.available(), 2 * FRAME);
    }
}
