//! The shard's permessage-deflate compressors and which one a connection's messages go through.
//!
//! One [`Compression`] per shard, owned by its router. A connection's [`Agreed`] parameters
//! (kept in its WebSocket state) pick the compressor: without context takeover (`shared` mode,
//! or a `dedicated` client that asked for `server_no_context_takeover`) the shard's own, for the
//! agreed window; with it, the connection's own `dedicated` compressor, kept here by token from
//! the upgrade to the close, so that the connection state of every other connection stays as
//! small as a plain one. Inflating is the codec's business (through the shard's
//! [`crate::service::deflate::ShardInflater`], which the router keeps beside this).

use std::collections::HashMap;

use crate::service::deflate::{
    self, Agreed, DeflateCounters, Deflater, ShardCompressors, LEVEL_THOROUGH,
};
use crate::service::Token;

/// How messages to one connection are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// No permessage-deflate: plain frames.
    Plain,
    /// Compressed without context takeover, with this window: the same compressed frame serves
    /// every such connection.
    Shared(u8),
    /// Compressed by the connection's own compressor.
    Dedicated,
}

impl Delivery {
    pub fn of(agreed: Option<Agreed>) -> Delivery {
        match agreed {
            None => Delivery::Plain,
            Some(a) if a.takeover => Delivery::Dedicated,
            Some(a) => Delivery::Shared(a.window_bits),
        }
    }
}

/// One shard's compressors.
#[derive(Default)]
pub struct Compression {
    compressors: ShardCompressors,
    dedicated: HashMap<Token, Box<Deflater>>,
    /// Where a compressed payload is built before its frame header is known.
    scratch: Vec<u8>,
}

impl Compression {
    /// A connection upgraded with `agreed`: a `dedicated` one gets its compressor.
    pub fn open(&mut self, token: Token, agreed: Agreed, counters: &DeflateCounters) {
        if agreed.takeover {
            let d = Box::new(Deflater::new(agreed, LEVEL_THOROUGH));
            if self.dedicated.insert(token, d).is_none() {
                counters.ws_deflate_dedicated.inc();
            }
        }
    }

    /// The connection closed.
    pub fn close(&mut self, token: Token, counters: &DeflateCounters) {
        if self.dedicated.remove(&token).is_some() {
            counters.ws_deflate_dedicated.sub(1);
        }
    }

    /// Appends a message to connection `token` as one frame, compressed as the connection
    /// agreed (and when it pays).
    pub fn write_message(
        &mut self,
        token: Token,
        agreed: Option<Agreed>,
        out: &mut Vec<u8>,
        opcode: u8,
        payload: &[u8],
        counters: &DeflateCounters,
    ) {
        let deflater = match Delivery::of(agreed) {
            Delivery::Plain => None,
            Delivery::Shared(bits) => Some(self.compressors.direct(bits)),
            Delivery::Dedicated => self.dedicated.get_mut(&token).map(|d| &mut **d),
        };
        deflate::write_message(out, opcode, payload, deflater, &mut self.scratch, counters);
    }

    /// Appends a published message (`frame`, a plain server frame) to a dedicated connection,
    /// compressed by its own compressor.
    pub fn write_dedicated_frame(
        &mut self,
        token: Token,
        out: &mut Vec<u8>,
        frame: &[u8],
        counters: &DeflateCounters,
    ) {
        let Ok(Some((opcode, _, range, _))) = crate::service::ws::decode_server_frame(frame) else {
            out.extend_from_slice(frame);
            return;
        };
        let deflater = self.dedicated.get_mut(&token).map(|d| &mut **d);
        deflate::write_message(
            out,
            opcode,
            &frame[range],
            deflater,
            &mut self.scratch,
            counters,
        );
    }

    /// Appends `frames` (plain server frames) to `packed`, each compressed once with the fan-out
    /// compressor for `window_bits`, recording where each ends.
    pub fn pack_fanout(
        &mut self,
        window_bits: u8,
        frames: &[std::sync::Arc<[u8]>],
        packed: &mut Vec<u8>,
        ends: &mut Vec<usize>,
        counters: &DeflateCounters,
    ) {
        let deflater = self.compressors.fanout(window_bits);
        for frame in frames {
            match crate::service::ws::decode_server_frame(frame) {
                Ok(Some((opcode, _, range, _))) => deflate::write_message(
                    packed,
                    opcode,
                    &frame[range],
                    Some(&mut *deflater),
                    &mut self.scratch,
                    counters,
                ),
                _ => packed.extend_from_slice(frame),
            }
            ends.push(packed.len());
        }
    }
}
