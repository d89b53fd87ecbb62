use bytes::BytesMut;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    time::timeout,
};

use std::{
    collections::VecDeque,
    io::{self, ErrorKind},
};
use tokio::time::{error::Elapsed, Duration};

use crate::protocol::{self, Packet, Protocol};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O = {0}")]
    Io(#[from] io::Error),
    #[error("Invalid data = {0}")]
    Protocol(#[from] protocol::Error),
    #[error["Keep alive timeout"]]
    KeepAlive(#[from] Elapsed),
}

/// Network transforms packets <-> frames efficiently. It takes
/// advantage of pre-allocation, buffering and vectorization when
/// appropriate to achieve performance
pub struct Network<P> {
    /// Socket for IO
    socket: Box<dyn N>,
    /// Buffered reads
    read: BytesMut,
    /// Buffered writes
    write: BytesMut,
    /// Maximum packet size
    max_incoming_size: usize,
    /// Maximum connection buffer count. TODO: Change this to use bytes for deterministicness
    max_connection_buffer_len: usize,
    /// Keep alive timeout
    keepalive: Duration,
    /// vitalmq patch 14: the peer's Maximum Packet Size (MQTT 5 3.1.2.11.4), if any
    max_outgoing_size: Option<usize>,
    /// Protocol
    protocol: P,
}

impl<P: Protocol> Network<P> {
    pub fn new(
        socket: Box<dyn N>,
        max_incoming_size: usize,
        max_connection_buffer_len: usize,
        protocol: P,
    ) -> Network<P> {
        Network {
            socket,
            // vitalmq patch 1: start small and grow with the traffic (BytesMut doubles
            // on demand) instead of 20 KiB for every connection, most of which are idle.
            read: BytesMut::with_capacity(2 * 1024),
            write: BytesMut::with_capacity(2 * 1024),
            max_incoming_size,
            max_connection_buffer_len,
            // Overwritten by keepalive value in connect packet, otherwise we
            // would wait indefinitely until we get a packet / network error
            // when we call read.
            keepalive: Duration::MAX,
            max_outgoing_size: None,
            protocol,
        }
    }

    pub fn set_keepalive(&mut self, keepalive: u16) {
        let keepalive = Duration::from_secs(keepalive as u64);
        self.keepalive = keepalive + keepalive.mul_f32(0.5);
    }

    /// Reads more than 'required' bytes to frame a packet into self.read buffer
    async fn read_bytes(&mut self, required: usize) -> io::Result<usize> {
        // TODO: Fix this cancellation bug and write unit test
        let mut total_read = 0;
        loop {
            let read = self.socket.read_buf(&mut self.read).await?;
            if 0 == read {
                let error = if self.read.is_empty() {
                    io::Error::new(ErrorKind::ConnectionAborted, "connection closed by peer")
                } else {
                    io::Error::new(ErrorKind::ConnectionReset, "connection reset by peer")
                };

                return Err(error);
            }

            total_read += read;
            if total_read >= required {
                return Ok(total_read);
            }
        }
    }

    /// Waits on network for 1 packet
    pub async fn read(&mut self) -> Result<Packet, Error> {
        loop {
            let required = match Protocol::read_mut(
                &mut self.protocol,
                &mut self.read,
                self.max_incoming_size,
            ) {
                Ok(packet) => return Ok(packet),
                Err(protocol::Error::InsufficientBytes(required)) => required,
                Err(e) => return Err(e.into()),
            };

            // read more packets until a frame can be created. This function
            // blocks until a frame can be created. Use this in a select! branch
            timeout(self.keepalive, self.read_bytes(required)).await??;
        }
    }

    /// Read packets in bulk. This allow replies to be in bulk. This method is used
    /// after the connection is established to read a bunch of incoming packets
    pub fn readv(&mut self, packets: &mut VecDeque<Packet>) -> Result<usize, Error> {
        loop {
            match self
                .protocol
                .read_mut(&mut self.read, self.max_incoming_size)
            {
                Ok(packet) => {
                    packets.push_back(packet);
                    let connection_buffer_length = packets.len();
                    if connection_buffer_length >= self.max_connection_buffer_len {
                        return Ok(connection_buffer_length);
                    }
                }
                Err(protocol::Error::InsufficientBytes(_)) => return Ok(packets.len()),
                Err(e) => return Err(io::Error::new(ErrorKind::InvalidData, e.to_string()).into()),
            }
        }
    }

    /// vitalmq patch 14: never write a packet larger than `max` bytes to this peer
    /// (MQTT-3.1.2-24), `None` for no limit.
    pub fn set_max_outgoing_size(&mut self, max: Option<usize>) {
        self.max_outgoing_size = max;
    }

    /// Writes `packet`, unless it exceeds the peer's Maximum Packet Size (patch 14):
    /// then it is returned, not written (see [`Network::writev`]).
    pub async fn write(&mut self, packet: Packet) -> Result<Option<Packet>, Error> {
        let dropped = self.encode(packet)?;
        self.socket.write_all(&self.write).await?;
        self.write.clear();
        Ok(dropped)
    }

    /// Writes `packets` in one go. vitalmq patch 14: a packet larger than the peer's
    /// Maximum Packet Size is not written (MQTT-3.1.2-24): an acknowledgement is first
    /// tried without its reason string and user properties (which the standard lets a
    /// sender leave out for that reason, MQTT-3.2.2-19/20, 3.4.2-2/3, ...); what still
    /// does not fit (a PUBLISH always) is returned, for the caller to complete as if it
    /// had been sent (MQTT-3.1.2-25).
    pub async fn writev(&mut self, packets: VecDeque<Packet>) -> Result<Vec<Packet>, Error> {
        let mut dropped = Vec::new();
        for packet in packets {
            dropped.extend(self.encode(packet)?);
        }
        if !self.write.is_empty() {
            self.socket.write_all(&self.write).await?;
            self.write.clear();
        }
        Ok(dropped)
    }

    /// Appends `packet` to the write buffer if it fits the peer's limit; returns it
    /// otherwise (patch 14).
    fn encode(&mut self, packet: Packet) -> Result<Option<Packet>, Error> {
        let Some(max) = self.max_outgoing_size else {
            Protocol::write(&self.protocol, packet, &mut self.write)?;
            return Ok(None);
        };
        let start = self.write.len();
        Protocol::write(&self.protocol, packet.clone(), &mut self.write)?;
        if self.write.len() - start <= max {
            return Ok(None);
        }
        self.write.truncate(start);
        if let Some(lean) = without_optional_properties(&packet) {
            Protocol::write(&self.protocol, lean, &mut self.write)?;
            if self.write.len() - start <= max {
                return Ok(None);
            }
            self.write.truncate(start);
        }
        Ok(Some(packet))
    }
}

/// vitalmq patch 14: `packet` without the properties a sender may leave out to stay
/// within the receiver's Maximum Packet Size (reason string, user properties); `None`
/// for a packet that has none to leave out (a PUBLISH's properties are part of the
/// application message).
fn without_optional_properties(packet: &Packet) -> Option<Packet> {
    macro_rules! lean {
        ($props:expr) => {
            $props.as_ref().map(|p| {
                let mut p = p.clone();
                p.reason_string = None;
                p.user_properties.clear();
                p
            })
        };
    }
    Some(match packet {
        Packet::ConnAck(ack, props) => Packet::ConnAck(ack.clone(), lean!(props)),
        Packet::PubAck(ack, props) => Packet::PubAck(ack.clone(), lean!(props)),
        Packet::PubRec(ack, props) => Packet::PubRec(ack.clone(), lean!(props)),
        Packet::PubRel(ack, props) => Packet::PubRel(ack.clone(), lean!(props)),
        Packet::PubComp(ack, props) => Packet::PubComp(ack.clone(), lean!(props)),
        Packet::SubAck(ack, props) => Packet::SubAck(ack.clone(), lean!(props)),
        Packet::UnsubAck(ack, props) => Packet::UnsubAck(ack.clone(), lean!(props)),
        Packet::Disconnect(d, props) => Packet::Disconnect(d.clone(), lean!(props)),
        _ => return None,
    })
}


pub trait N: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T> N for T where T: AsyncRead + AsyncWrite + Unpin + Send {}
