//! One logged-in session: the read loop, the hold, keepalive, and the Logoff at the end.

use super::*;

impl Task {
    pub(super) async fn session<S>(&mut self, mut io: S, address: String) -> End
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let epoch = self.next_epoch();
        let mut ids = Ids::new(&self.cfg.id, epoch);
        let mut buf = BytesMut::with_capacity(4096);
        let mut codec = AmiCodec::new(self.opts.limits);
        let cfg = self.cfg.clone();
        let ok = {
            let mut next_id = || ids.next();
            let exchange = tokio::time::timeout(
                cfg.login_timeout,
                login(&mut io, &mut buf, &mut codec, &cfg, &mut next_id),
            );
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return End::Shutdown,
                r = exchange => match r {
                    Err(_) => return End::Login(LoginError::Timeout, epoch),
                    Ok(Err(e)) => return End::Login(e, epoch),
                    Ok(Ok(ok)) => ok,
                },
            }
        };
        let started = Instant::now();
        let at = now_ns();
        self.stats.epoch.store(epoch, Ordering::Relaxed);
        self.stats.connected.store(true, Ordering::Relaxed);
        self.stats.last_byte_ns.store(at, Ordering::Relaxed);
        self.out.start_epoch(epoch);
        info!(server = %self.cfg.id, %address, epoch, ami_version = %ok.ami_version, "AMI connected");
        let up = Record::ConnectionUp {
            ami_version: ok.ami_version,
            address,
        };
        if self.out.emit(up, at).is_err() {
            return End::DownstreamClosed;
        }
        let mut s = Session {
            ids,
            pending: HashMap::new(),
            reply_bytes: 0,
            ping: None,
            next_ping: started + self.cfg.keepalive_interval,
            last_byte: started,
            wbuf: BytesMut::new(),
            read_size: READ_MIN,
            gate: Gate::Open,
            snapshot: Snapshots::new(
                self.out.server.clone(),
                Arc::new(self.cfg.snapshot.clone()),
                self.stats.snapshot.clone(),
                epoch,
                self.gaps_so_far(),
            ),
        };
        // Frames that came with the login responses, then bytes already buffered behind them.
        let mut result = Ok(());
        for item in ok.early {
            result = result.and_then(|()| self.dispatch(&mut s, item, at));
        }
        while result.is_ok() {
            match codec.decode(&mut buf) {
                Ok(Some(item)) => result = self.dispatch(&mut s, item, at),
                Ok(None) | Err(_) => break,
            }
        }
        let reason = match result {
            Err(DownstreamClosed) => None,
            Ok(()) => self.read_loop(io, &mut buf, &mut codec, &mut s).await,
        };
        // Everything still waiting was (or may have been) sent: its outcome is unknown.
        for (_, p) in s.pending.drain() {
            p.reply.unknown(Unknown::ConnectionLost);
        }
        self.stats.connected.store(false, Ordering::Relaxed);
        let Some(ended) = reason else {
            return End::DownstreamClosed;
        };
        let reason = ended.reason().to_owned();
        if let Some(end) = s.snapshot.abort(&reason)
            && self.out.emit(end, now_ns()).is_err()
        {
            return End::DownstreamClosed;
        }
        if self
            .out
            .emit(
                Record::ConnectionDown {
                    reason: reason.clone(),
                },
                now_ns(),
            )
            .is_err()
        {
            return End::DownstreamClosed;
        }
        if matches!(ended, Ended::Shutdown) {
            info!(server = %self.cfg.id, epoch, "AMI connection closed for shutdown");
            return End::Shutdown;
        }
        End::Disconnected {
            reason,
            uptime: started.elapsed(),
        }
    }

    /// Read until the session ends; why it ended, or `None` if downstream is gone.
    pub(super) async fn read_loop<S>(
        &mut self,
        io: S,
        buf: &mut BytesMut,
        codec: &mut AmiCodec,
        s: &mut Session,
    ) -> Option<Ended>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (mut rd, mut wr) = tokio::io::split(io);
        let idle_limit = self.cfg.keepalive_interval + self.cfg.keepalive_timeout;
        loop {
            // A snapshot that is due starts (its actions go into the write buffer), one past
            // its deadline ends; never a wait.
            let gaps = self.gaps_so_far();
            while let Some(r) =
                s.snapshot
                    .due(Instant::now(), gaps, &mut || s.ids.next(), &mut s.wbuf)
            {
                if self.out.emit(r, now_ns()).is_err() {
                    return None;
                }
            }
            let mut wake = s.next_ping.min(s.last_byte + idle_limit);
            if let Some((_, deadline)) = &s.ping {
                wake = wake.min(*deadline);
            }
            if let Some(t) = s.snapshot.next_wake() {
                wake = wake.min(t);
            }
            let held = self.hold_until(s);
            if buf.capacity() - buf.len() < s.read_size / 4 {
                buf.reserve(s.read_size);
            }
            let room = buf.capacity() - buf.len();
            let gap_tx = (!self.out.gaps.is_empty()).then(|| self.out.tx.clone());
            let can_take = s.pending.len() < self.opts.max_in_flight && !self.cmds_closed;
            // Biased, with the read last: under a flood the socket is always readable, and a
            // read listed first would starve writes and the keepalive timer. The other branches
            // are ready only when they have work, so the read still runs on nearly every turn.
            // During a hold the read is off and `hold` is on in its place: everything else is
            // served as usual.
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => {
                    return self.logoff(&mut rd, &mut wr, buf, codec, s).await.then_some(Ended::Shutdown);
                }
                r = write_some(&mut wr, &mut s.wbuf), if !s.wbuf.is_empty() => {
                    if let Err(e) = r {
                        return Some(Ended::Lost(format!("io error: {e}")));
                    }
                }
                permit = reserve(gap_tx) => match permit {
                    Ok(p) => if self.out.send_gap(p).is_err() { return None },
                    Err(DownstreamClosed) => return None,
                },
                cmd = self.cmd_rx.recv(), if can_take => match cmd {
                    Some(c) => self.take_command(s, c),
                    None => self.cmds_closed = true,
                },
                _ = sleep_until(wake) => {
                    let now = Instant::now();
                    if s.ping.as_ref().is_some_and(|(_, d)| now >= *d) || now >= s.last_byte + idle_limit {
                        return Some(Ended::Lost("keepalive timeout".to_owned()));
                    }
                    if now >= s.next_ping {
                        if s.ping.is_none() {
                            let id = s.ids.next();
                            if Action::new("Ping").encode(Some(&id), &mut s.wbuf).is_ok() {
                                s.ping = Some((id, now + self.cfg.keepalive_timeout));
                            }
                        }
                        s.next_ping = now + self.cfg.keepalive_interval;
                    }
                    // Forget actions whose caller has given up; answer those whose deadline
                    // has passed `TimedOut` (they may have run; never "not sent").
                    let over: Vec<String> = s
                        .pending
                        .iter()
                        .filter(|(_, p)| p.reply.is_closed() || p.deadline <= now)
                        .map(|(id, _)| id.clone())
                        .collect();
                    for id in over {
                        if let Some(p) = s.pending.remove(&id) {
                            s.reply_bytes -= p.bytes;
                            p.reply.unknown(Unknown::TimedOut);
                        }
                    }
                }
                end = hold(&self.out.tx, held), if held.is_some() => match end {
                    Ok(HoldEnd::Room) => s.gate = Gate::Granted,
                    // Room that came with the deadline still counts as room.
                    Ok(HoldEnd::Deadline) if self.out.tx.has_room() => s.gate = Gate::Granted,
                    Ok(HoldEnd::Deadline) => {
                        inc(&self.stats.read_pause_timeouts);
                        s.gate = Gate::Shedding;
                    }
                    Err(DownstreamClosed) => return None,
                },
                r = rd.read_buf(buf), if held.is_none() => {
                    if s.gate == Gate::Granted {
                        s.gate = Gate::Open;
                    }
                    let n = match r {
                        Ok(0) => {
                            let at = now_ns();
                            while let Ok(Some(item)) = codec.decode_eof(buf) {
                                if self.dispatch(s, item, at).is_err() {
                                    return None;
                                }
                            }
                            return Some(Ended::Lost("eof".to_owned()));
                        }
                        Ok(n) => n,
                        Err(e) => return Some(Ended::Lost(format!("io error: {e}"))),
                    };
                    s.read_size = next_read_size(s.read_size, room, n);
                    let at = now_ns();
                    s.last_byte = Instant::now();
                    self.stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
                    self.stats.last_byte_ns.store(at, Ordering::Relaxed);
                    while let Ok(Some(item)) = codec.decode(buf) {
                        if self.dispatch(s, item, at).is_err() {
                            return None;
                        }
                        // One unit of the runtime's budget per frame, not per read: a read
                        // carries dozens of frames, and a flood on four sockets otherwise held
                        // the workers for milliseconds at a time while the sink driver, which
                        // spends a unit per record, waited its turn (it delivered ~20,000
                        // records/s while a burst was read, against ~160,000 after).
                        tokio::task::consume_budget().await;
                    }
                }
            }
        }
    }

    /// Gap records for this server so far, its own and those made downstream: a snapshot
    /// follows when the count moves.
    fn gaps_so_far(&self) -> u64 {
        self.stats.gaps.load(Ordering::Relaxed) + self.downstream_gaps.load(Ordering::Relaxed)
    }

    /// At the top of each turn of the read loop: the deadline of the hold in force, if any.
    /// A turn that finds less than the headroom free begins a hold (unless the connection is
    /// shedding or `handoff_wait` is zero); room in the queue ends a hold and shedding.
    pub(super) fn hold_until(&mut self, s: &mut Session) -> Option<Instant> {
        if s.gate == Gate::Granted {
            return None;
        }
        if self.opts.handoff_wait.is_zero() || self.out.tx.has_room() {
            s.gate = Gate::Open;
            return None;
        }
        match s.gate {
            Gate::Held(until) => Some(until),
            Gate::Shedding | Gate::Granted => None,
            Gate::Open => {
                inc(&self.stats.read_pauses);
                let until = Instant::now() + self.opts.handoff_wait;
                s.gate = Gate::Held(until);
                Some(until)
            }
        }
    }

    /// Send `Logoff` and wait a little for `Goodbye`, handing on what arrives meanwhile.
    /// `false` if downstream is gone.
    pub(super) async fn logoff<R, W>(
        &mut self,
        rd: &mut R,
        wr: &mut W,
        buf: &mut BytesMut,
        codec: &mut AmiCodec,
        s: &mut Session,
    ) -> bool
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let id = s.ids.next();
        if Action::new("Logoff")
            .encode(Some(&id), &mut s.wbuf)
            .is_err()
        {
            return true;
        }
        let deadline = Instant::now() + self.opts.logoff_timeout;
        loop {
            if buf.capacity() - buf.len() < 2048 {
                buf.reserve(8192);
            }
            tokio::select! {
                _ = sleep_until(deadline) => return true,
                r = write_some(wr, &mut s.wbuf), if !s.wbuf.is_empty() => {
                    if r.is_err() { return true; }
                }
                r = rd.read_buf(buf) => {
                    if !matches!(r, Ok(n) if n > 0) {
                        return true;
                    }
                    let at = now_ns();
                    while let Ok(Some(item)) = codec.decode(buf) {
                        if let Decoded::Frame(f) = &item
                            && f.frame().get("ActionID") == Some(id.as_bytes())
                        {
                            return true;
                        }
                        if self.dispatch(s, item, at).is_err() {
                            return false;
                        }
                    }
                }
            }
        }
    }
}

pub(super) async fn write_some<W: AsyncWrite + Unpin>(
    w: &mut W,
    buf: &mut BytesMut,
) -> std::io::Result<()> {
    if w.write_buf(buf).await? == 0 {
        return Err(std::io::ErrorKind::WriteZero.into());
    }
    if buf.is_empty() {
        w.flush().await?;
    }
    Ok(())
}

/// Why a session ended.
pub(super) enum Ended {
    /// amibus is stopping: it logged off.
    Shutdown,
    /// The server or the network ended it: `eof`, `keepalive timeout`, `io error: …`.
    Lost(String),
}

impl Ended {
    /// The `ConnectionDown` reason (its stable label first).
    fn reason(&self) -> &str {
        match self {
            Ended::Shutdown => "shutdown",
            Ended::Lost(reason) => reason,
        }
    }
}
