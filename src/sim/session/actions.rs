//! The actions a simulated Asterisk answers: login, ping, lists, Originate, Command, filters,
//! events on and off, and the error Asterisk gives for the rest.

use super::*;

pub(super) fn is(name: &[u8], s: &str) -> bool {
    name.eq_ignore_ascii_case(s.as_bytes())
}

pub(super) fn nonempty(v: Option<&[u8]>) -> Option<&[u8]> {
    v.filter(|v| !v.is_empty())
}

pub(super) async fn action<W: AsyncWrite + Unpin>(
    srv: &Arc<Server>,
    w: &mut Writer<W>,
    st: &mut State,
    f: Frame<'_>,
) -> Flow {
    match action_inner(srv, w, st, f).await {
        Ok(flow) => flow,
        Err(r) => Flow::Close(r),
    }
}

pub(super) async fn action_inner<W: AsyncWrite + Unpin>(
    srv: &Arc<Server>,
    w: &mut Writer<W>,
    st: &mut State,
    f: Frame<'_>,
) -> Result<Flow, DisconnectReason> {
    let aid = f.get("ActionID");
    let Some(name) = nonempty(f.get("Action")) else {
        w.write(&error(aid, "Missing action in request")).await?;
        return Ok(Flow::Continue);
    };
    let cfg = &srv.cfg;
    if is(name, "Logoff") {
        w.write(
            &Resp::new("Goodbye", aid)
                .kv("Message", b"Thanks for all the fish.")
                .done(),
        )
        .await?;
        return Ok(Flow::Close(DisconnectReason::Logoff));
    }
    if is(name, "Challenge") {
        let ok = f.get("AuthType").is_some_and(|t| is(t, "MD5"));
        if !ok {
            w.write(&error(aid, "Must specify AuthType")).await?;
            return Ok(Flow::Continue);
        }
        let challenge = st
            .challenge
            .get_or_insert_with(|| {
                let seed = (st.id + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ srv.cfg.seed;
                let mut rng = crate::sim::source::Rng::new(seed);
                (rng.below(999_999_999) + 1).to_string()
            })
            .clone();
        w.write(
            &Resp::new("Success", aid)
                .kv("Challenge", challenge.as_bytes())
                .done(),
        )
        .await?;
        return Ok(Flow::Continue);
    }
    if is(name, "Login") {
        if st.authed {
            w.write(&success(aid, "Already authenticated")).await?;
            return Ok(Flow::Continue);
        }
        let user_ok = f.get("Username") == Some(cfg.username.as_bytes());
        let md5 = f.get("AuthType").is_some_and(|t| is(t, "MD5"));
        let secret_ok = if md5 {
            match (&st.challenge, nonempty(f.get("Key"))) {
                (Some(c), Some(key)) => key == md5::login_key(c, &cfg.secret).as_bytes(),
                _ => false,
            }
        } else {
            f.get("Secret") == Some(cfg.secret.as_bytes())
        };
        if !(user_ok && secret_ok) {
            tokio::time::sleep(cfg.auth_fail_delay).await;
            w.write(&error(aid, "Authentication failed")).await?;
            return Ok(Flow::Close(DisconnectReason::AuthFailed));
        }
        st.authed = true;
        if let Some(ev) = f.get("Events") {
            st.mask = filter::parse_event_mask(ev);
        }
        srv.counters.logins.fetch_add(1, Ordering::Relaxed);
        let mut out = success(aid, "Authentication accepted");
        if st.mask & class::SYSTEM != 0 {
            let up = srv.started.elapsed().as_secs().to_string();
            out.extend_from_slice(b"Event: FullyBooted\r\nPrivilege: system,all\r\n");
            push_kv(&mut out, "Uptime", up.as_bytes());
            push_kv(&mut out, "LastReload", up.as_bytes());
            out.extend_from_slice(b"Status: Fully Booted\r\n\r\n");
        }
        w.write(&out).await?;
        st.events = Some(srv.hub.subscribe(st.id, srv.cfg.session_queue));
        return Ok(Flow::Continue);
    }
    if !st.authed {
        w.write(&error(aid, "Permission denied")).await?;
        return Ok(Flow::Continue);
    }
    srv.tally.record(&f);
    let out = if is(name, "Ping") {
        Resp::new("Success", aid)
            .kv("Ping", b"Pong")
            .kv("Timestamp", &wall_ts())
            .done()
    } else if is(name, "Events") {
        if let Some(m) = f.get("EventMask").or(f.get("Events")) {
            st.mask = filter::parse_event_mask(m);
        }
        let on: &[u8] = if st.mask != 0 { b"On" } else { b"Off" };
        Resp::new("Success", aid).kv("Events", on).done()
    } else if is(name, "Filter") {
        let op = f.get("Operation").unwrap_or_default();
        if !is(op, "Add") {
            error(aid, "Unknown operation")
        } else {
            match Filter::parse(f.get("Filter"), f.get("MatchCriteria")) {
                Ok(fl) => {
                    st.filters.push(fl);
                    success(aid, "Success")
                }
                Err(e) => error(aid, &e.to_string()),
            }
        }
    } else if is(name, "CoreShowChannels") {
        let chans = call_gen(srv, st, w, |g, _| g.channels())
            .await?
            .unwrap_or_default();
        list::core_show_channels(aid, &chans)
    } else if is(name, "QueueStatus") {
        let only = nonempty(f.get("Queue")).map(<[u8]>::to_vec);
        let id = aid.map(<[u8]>::to_vec);
        call_gen(srv, st, w, move |g, _| {
            g.lists()
                .queue_status(id.as_deref(), only.as_deref(), g.now_us())
        })
        .await?
        .unwrap_or_else(|| list::Tracker::default().queue_status(aid, None, 0))
    } else if is(name, "DeviceStateList") {
        let id = aid.map(<[u8]>::to_vec);
        call_gen(srv, st, w, move |g, _| {
            g.lists().device_state_list(id.as_deref())
        })
        .await?
        .unwrap_or_else(|| list::Tracker::default().device_state_list(aid))
    } else if is(name, "BridgeList") {
        let kind = nonempty(f.get("BridgeType")).map(<[u8]>::to_vec);
        let id = aid.map(<[u8]>::to_vec);
        call_gen(srv, st, w, move |g, _| {
            g.lists().bridge_list(id.as_deref(), kind.as_deref())
        })
        .await?
        .unwrap_or_else(|| list::Tracker::default().bridge_list(aid, None))
    } else if is(name, "Status") {
        let want = nonempty(f.get("Channel")).map(<[u8]>::to_vec);
        let chans = call_gen(srv, st, w, |g, _| g.channels())
            .await?
            .unwrap_or_default();
        let vars: Vec<Vec<u8>> = f
            .get("Variables")
            .map(|v| {
                v.split(|&b| b == b',')
                    .map(|s| s.trim_ascii().to_vec())
                    .collect()
            })
            .unwrap_or_default();
        list::status(aid, &chans, want.as_deref(), &vars)
    } else if is(name, "Originate") {
        originate(srv, st, w, &f, aid).await?
    } else if is(name, "Hangup") {
        match nonempty(f.get("Channel")).map(<[u8]>::to_vec) {
            None => error(aid, "No channel specified"),
            Some(ch) => {
                let found = call_gen(srv, st, w, move |g, _| g.hangup(&ch)).await?;
                if found == Some(true) {
                    success(aid, "Channel Hungup")
                } else {
                    error(aid, "No such channel")
                }
            }
        }
    } else if is(name, "Redirect") {
        match nonempty(f.get("Channel")).map(<[u8]>::to_vec) {
            None => error(aid, "Channel not specified"),
            Some(ch) => {
                let c2 = ch.clone();
                let found = call_gen(srv, st, w, move |g, _| g.exists(&c2)).await?;
                if found == Some(true) {
                    success(aid, "Redirect successful")
                } else {
                    let msg = format!("Channel does not exist: {}", String::from_utf8_lossy(&ch));
                    error(aid, &msg)
                }
            }
        }
    } else if is(name, "Getvar") {
        match nonempty(f.get("Variable")).map(<[u8]>::to_vec) {
            None => error(aid, "No variable specified"),
            Some(var) => {
                let ch = nonempty(f.get("Channel")).map(<[u8]>::to_vec);
                let v2 = var.clone();
                let r = call_gen(srv, st, w, move |g, _| g.getvar(ch.as_deref(), &v2)).await?;
                match r {
                    Some(Ok(val)) => Resp::new("Success", aid)
                        .kv("Variable", &var)
                        .kv("Value", &val)
                        .done(),
                    _ => error(aid, "No such channel"),
                }
            }
        }
    } else if is(name, "Setvar") {
        match nonempty(f.get("Variable")).map(<[u8]>::to_vec) {
            None => error(aid, "No variable specified"),
            Some(var) => {
                let ch = nonempty(f.get("Channel")).map(<[u8]>::to_vec);
                let val = f.get("Value").unwrap_or_default().to_vec();
                let r =
                    call_gen(srv, st, w, move |g, _| g.setvar(ch.as_deref(), &var, &val)).await?;
                match r {
                    Some(Ok(())) => success(aid, "Variable Set"),
                    _ => error(aid, "No such channel"),
                }
            }
        }
    } else if is(name, "UserEvent") {
        match nonempty(f.get("UserEvent")).map(<[u8]>::to_vec) {
            None => error(aid, "UserEvent header missing"),
            Some(ue) => {
                let mut body = Vec::new();
                push_kv(&mut body, "UserEvent", &ue);
                for h in f.headers() {
                    if h.is("Action") || h.is("UserEvent") {
                        continue;
                    }
                    body.extend_from_slice(h.key);
                    if let Some(v) = h.value {
                        body.extend_from_slice(b": ");
                        body.extend_from_slice(v);
                    }
                    body.extend_from_slice(b"\r\n");
                }
                let resp = success(aid, "Event Sent");
                w.write(&resp).await?;
                call_gen(srv, st, w, move |g, out| {
                    g.inject(
                        b"Event: UserEvent\r\nPrivilege: user,all\r\n",
                        &body,
                        class::USER,
                        out,
                    )
                })
                .await?;
                return Ok(Flow::Continue);
            }
        }
    } else if is(name, "Command") {
        command(srv, st, w, aid, f.get("Command")).await?
    } else {
        let msg = format!(
            "Invalid/unknown command: {}. Use Action: ListCommands to show available commands.",
            String::from_utf8_lossy(name)
        );
        error(aid, &msg)
    };
    w.write(&out).await?;
    Ok(Flow::Continue)
}

pub(super) const TECHS: &[&[u8]] = &[b"Local/", b"PJSIP/", b"SIP/", b"IAX2/", b"DAHDI/"];

pub(super) async fn originate<W: AsyncWrite + Unpin>(
    srv: &Arc<Server>,
    st: &mut State,
    w: &mut Writer<W>,
    f: &Frame<'_>,
    aid: Option<&[u8]>,
) -> Result<Vec<u8>, DisconnectReason> {
    let Some(channel) = nonempty(f.get("Channel")).map(<[u8]>::to_vec) else {
        return Ok(error(aid, "Channel not specified"));
    };
    let exten = nonempty(f.get("Exten")).map(<[u8]>::to_vec);
    let context = nonempty(f.get("Context")).map(<[u8]>::to_vec);
    let app = nonempty(f.get("Application")).map(<[u8]>::to_vec);
    if exten.is_some() && (context.is_none() || nonempty(f.get("Priority")).is_none()) {
        return Ok(error(
            aid,
            "Originate with 'Exten' requires 'Context' and 'Priority'",
        ));
    }
    let is_async = f.get("Async").is_some_and(|v| {
        let v = v.trim_ascii();
        is(v, "true") || is(v, "yes") || is(v, "1") || is(v, "on")
    });
    let known = TECHS
        .iter()
        .any(|t| channel.len() > t.len() && channel[..t.len()].eq_ignore_ascii_case(t));
    let (context, exten) = match (context, exten, app) {
        (c, Some(e), _) => (c.unwrap_or_default(), e),
        (_, None, Some(a)) => (b"default".to_vec(), a),
        _ => (b"default".to_vec(), b"s".to_vec()),
    };
    let id = aid.map(<[u8]>::to_vec);
    if is_async {
        w.write(&success(aid, "Originate successfully queued"))
            .await?;
    }
    let ok = call_gen(srv, st, w, move |g, out| {
        if known {
            g.originate(&channel, &context, &exten, id.as_deref(), out)
                .is_some()
        } else {
            let mut body = Vec::new();
            if let Some(id) = &id {
                push_kv(&mut body, "ActionID", id);
            }
            push_kv(&mut body, "Response", b"Failure");
            push_kv(&mut body, "Channel", &channel);
            push_kv(&mut body, "Context", &context);
            push_kv(&mut body, "Exten", &exten);
            push_kv(&mut body, "Reason", b"0");
            push_kv(&mut body, "Uniqueid", b"<unknown>");
            push_kv(&mut body, "CallerIDNum", b"<unknown>");
            push_kv(&mut body, "CallerIDName", b"<unknown>");
            g.inject(
                b"Event: OriginateResponse\r\nPrivilege: call,all\r\n",
                &body,
                class::CALL,
                out,
            );
            false
        }
    })
    .await?;
    if is_async {
        // The response went out first; nothing more to say.
        return Ok(Vec::new());
    }
    Ok(if ok == Some(true) {
        success(aid, "Originate successfully queued")
    } else {
        error(aid, "Originate failed")
    })
}

pub(super) async fn command<W: AsyncWrite + Unpin>(
    srv: &Arc<Server>,
    st: &mut State,
    w: &mut Writer<W>,
    aid: Option<&[u8]>,
    cmd: Option<&[u8]>,
) -> Result<Vec<u8>, DisconnectReason> {
    let Some(cmd) = nonempty(cmd) else {
        return Ok(error(aid, "No command provided"));
    };
    let text = String::from_utf8_lossy(cmd).trim().to_ascii_lowercase();
    let (ok, lines): (bool, Vec<String>) = match text.as_str() {
        "core show version" => (
            true,
            vec!["Asterisk 22.0.0 (amibus sim) built by amibus on a x86_64 running Linux".into()],
        ),
        "core show uptime" | "core show uptime seconds" => {
            let s = srv.started.elapsed().as_secs();
            (
                true,
                vec![
                    format!("System uptime: {s} seconds"),
                    format!("Last reload: {s} seconds"),
                ],
            )
        }
        "core show channels" | "core show channels concise" => {
            let chans = call_gen(srv, st, w, |g, _| g.channels())
                .await?
                .unwrap_or_default();
            let mut v = vec![format!(
                "{:<20} {:<20} {:<20} {}",
                "Channel", "Location", "State", "Application(Data)"
            )];
            for c in &chans {
                v.push(format!(
                    "{:<20} {:<20} {:<20} {}({})",
                    String::from_utf8_lossy(&c.name),
                    format!(
                        "{}@{}:1",
                        String::from_utf8_lossy(&c.exten),
                        String::from_utf8_lossy(&c.context)
                    ),
                    String::from_utf8_lossy(list::state_desc(c.state)),
                    c.app,
                    String::from_utf8_lossy(&c.app_data)
                ));
            }
            let calls: std::collections::HashSet<&[u8]> =
                chans.iter().map(|c| c.linkedid.as_slice()).collect();
            v.push(format!("{} active channels", chans.len()));
            v.push(format!("{} active calls", calls.len()));
            (true, v)
        }
        _ => {
            let c = String::from_utf8_lossy(cmd);
            (
                false,
                vec![format!(
                    "No such command '{c}' (type 'core show help {c}' for other possible commands)"
                )],
            )
        }
    };
    let mut r = Resp::new(if ok { "Success" } else { "Error" }, aid)
        .kv("Message", b"Command output follows");
    for l in lines {
        r = r.kv("Output", l.as_bytes());
    }
    Ok(r.done())
}
