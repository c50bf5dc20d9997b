//! The protobuf codec of every hostmesh gRPC service, client and server:
//! prost encoding with small starting buffers.
//!
//! tonic's default starts each stream with an 8 KiB encode buffer and an
//! 8 KiB decode buffer. A controller holds one long-lived stream per host,
//! and what flows on it is mostly acks and heartbeats of a few dozen bytes,
//! so 16 KiB per host would sit unused (1,000 hosts: 16 MB). Buffers start
//! at 1 KiB and grow to the largest message actually sent or received.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Starting size of a stream's encode and decode buffers.
pub const BUFFER_SIZE: usize = 1024;

/// How much encoded data a stream gathers before handing it to HTTP/2
/// (tonic's default).
pub const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`ProstCodec`] with [`BUFFER_SIZE`] buffers (named by `build.rs` as the
/// generated services' codec).
#[derive(Debug, Clone)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        SmallBufferCodec(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}
