//! Switchyard journal workload on redb, fjall and SQLite — see ADR 0001.
//!
//! cargo run --release --manifest-path host/benches/store-compare/Cargo.toml -- [options]
//!
//! Options (defaults keep the whole run near 2–3 minutes on 2 cores):
//!   --secs F         seconds per measurement cell           (0.75)
//!   --rounds N       interleaved rounds over all stores      (6)
//!   --preload N      events in each store before round 1     (20000)
//!   --size-n N       appends for the size / crash phase      (50000)
//!   --size-batch N   appends per durable commit when loading (64)
//!   --crash-secs F   how long the child writes before kill -9 (1.0)
//!   --stores a,b     subset of redb,redb-qr,fjall,sqlite     (all)
//!   --dir PATH       scratch dir (default: <crate>/target/tmp; not /tmp)
//!   --keep           keep the scratch dir

mod stores;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use stores::{Kind, Rec, Res, Store};

// ------------------------------------------------------------------ utilities

struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The event id for a sequence number: a random-looking 36-char UUID string
/// (deterministic so readers and the crash check can find any committed event).
fn id_for(seq: u64) -> String {
    let a = mix(seq ^ 0xA5A5_5A5A_1234_5678);
    let b = mix(a ^ seq);
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

/// A pool of ~1 KiB CloudEvents-like JSON bodies, about half random text.
fn body_pool() -> Vec<Arc<[u8]>> {
    let mut rng = Rng::new(7);
    let alnum = |rng: &mut Rng, n: usize| -> String {
        const A: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
        (0..n)
            .map(|_| A[rng.below(A.len() as u64) as usize] as char)
            .collect()
    };
    (0..64)
        .map(|i| {
            let mut s = format!(
                "{{\"specversion\":\"1.0\",\"id\":\"{}\",\"source\":\"shop\",\"type\":\"order.created\",\
                 \"time\":\"2026-11-20T10:{:02}:00Z\",\"datacontenttype\":\"application/json\",\"data\":{{\
                 \"order_id\":\"{}\",\"customer\":{{\"email\":\"{}@example.com\",\"name\":\"{}\"}},\"items\":[",
                id_for(i),
                i % 60,
                alnum(&mut rng, 16),
                alnum(&mut rng, 12),
                alnum(&mut rng, 14)
            );
            for j in 0..3 {
                s += &format!(
                    "{{\"sku\":\"{}\",\"qty\":{},\"price\":{}}},",
                    alnum(&mut rng, 10),
                    1 + j,
                    rng.below(10_000)
                );
            }
            s.pop();
            s += &format!("],\"total\":{},\"note\":\"", rng.below(100_000));
            let pad = 1024usize.saturating_sub(s.len() + 3);
            s += &alnum(&mut rng, pad);
            s += "\"}}";
            Arc::from(s.into_bytes().into_boxed_slice())
        })
        .collect()
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

fn dir_size(p: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let (mut apparent, mut alloc) = (0, 0);
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                let (a, b) = dir_size(&e.path());
                apparent += a;
                alloc += b;
            } else {
                apparent += m.len();
                alloc += m.blocks() * 512;
            }
        }
    }
    (apparent, alloc)
}

/// Block-device counters (write I/Os, sectors written, flushes) for the device
/// holding `dir`, from /proc/diskstats (Linux); zeros elsewhere.
#[derive(Clone, Copy, Default)]
struct Io {
    writes: u64,
    sectors: u64,
    flushes: u64,
}
static DEV: std::sync::OnceLock<(u64, u64)> = std::sync::OnceLock::new();
fn io_now() -> Io {
    let Some(&(maj, min)) = DEV.get() else {
        return Io::default();
    };
    let Ok(s) = std::fs::read_to_string("/proc/diskstats") else {
        return Io::default();
    };
    for l in s.lines() {
        let f: Vec<u64> = l
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        // major minor [name skipped] reads ... ; after name: f[2..]
        if f.len() >= 17 && f[0] == maj && f[1] == min {
            return Io {
                writes: f[6],
                sectors: f[8],
                flushes: f.get(17).copied().unwrap_or(0),
            };
        }
    }
    Io::default()
}
impl std::ops::Sub for Io {
    type Output = Io;
    fn sub(self, o: Io) -> Io {
        Io {
            writes: self.writes.saturating_sub(o.writes),
            sectors: self.sectors.saturating_sub(o.sectors),
            flushes: self.flushes.saturating_sub(o.flushes),
        }
    }
}
impl std::ops::AddAssign for Io {
    fn add_assign(&mut self, o: Io) {
        self.writes += o.writes;
        self.sectors += o.sectors;
        self.flushes += o.flushes;
    }
}

// ------------------------------------------------------------------ the journal model

struct Ctx {
    store: Box<dyn Store>,
    /// Next sequence number; everything below it is committed.
    next_seq: u64,
    bodies: Arc<Vec<Arc<[u8]>>>,
}

impl Ctx {
    fn open(kind: Kind, dir: &Path, bodies: Arc<Vec<Arc<[u8]>>>) -> Res<Self> {
        Ok(Ctx {
            store: kind.open(dir)?,
            next_seq: 0,
            bodies,
        })
    }
    fn rec(&mut self, rng: &mut Rng) -> Rec {
        let seq = self.next_seq;
        self.next_seq += 1;
        Rec {
            seq,
            id: id_for(seq),
            body: self.bodies[(seq % 64) as usize].clone(),
            deliveries: 1 + (rng.next() & 1) as u8,
        }
    }
    /// Bulk load `n` appends, `batch` per durable commit; returns appends/s.
    fn load(&mut self, n: u64, batch: u64) -> Res<f64> {
        let mut w = self.store.writer()?;
        let mut rng = Rng::new(1);
        let t = Instant::now();
        let mut done = 0;
        while done < n {
            let k = batch.min(n - done);
            let recs: Vec<Rec> = (0..k).map(|_| self.rec(&mut rng)).collect();
            w.commit(&recs)?;
            done += k;
        }
        Ok(n as f64 / t.elapsed().as_secs_f64())
    }
}

/// (a) one append per transaction, sequential.
fn scen_sequential(ctx: &mut Ctx, dur: Duration) -> Res<(f64, Vec<Duration>, Io)> {
    let mut w = ctx.store.writer()?;
    let mut rng = Rng::new(2);
    let mut lats = Vec::new();
    let io0 = io_now();
    let t = Instant::now();
    while t.elapsed() < dur {
        let r = [ctx.rec(&mut rng)];
        let t0 = Instant::now();
        w.commit(&r)?;
        lats.push(t0.elapsed());
    }
    Ok((
        lats.len() as f64 / t.elapsed().as_secs_f64(),
        lats,
        io_now() - io0,
    ))
}

#[derive(Default)]
struct Group {
    appends_per_s: f64,
    lats: Vec<Duration>,
    batches: u64,
    appends: u64,
    reads_per_s: f64,
    read_lats: Vec<Duration>,
    commit_lats: Vec<Duration>,
    io: Io,
}

struct Req {
    deliveries: u8,
    reply: mpsc::Sender<()>,
}

/// (b) group commit with `producers` threads, and (c) optionally one reader
/// doing point reads by id meanwhile. With `acks`, prints each committed seq
/// (used by the kill -9 child) and runs until killed.
fn scen_group(
    ctx: &mut Ctx,
    producers: usize,
    dur: Duration,
    with_reader: bool,
    mut acks: Option<std::io::Stdout>,
) -> Res<Group> {
    const MAX_BATCH: usize = 1024;
    let stop = AtomicBool::new(false);
    let committed = AtomicU64::new(ctx.next_seq);
    let mut writer = ctx.store.writer()?;
    let reader = if with_reader {
        Some(ctx.store.reader()?)
    } else {
        None
    };
    let (tx, rx) = mpsc::channel::<Req>();
    let io0 = io_now();
    let t = Instant::now();
    let mut out = Group::default();

    std::thread::scope(|s| -> Res<()> {
        let (stop, committed) = (&stop, &committed);
        let mut prods = Vec::new();
        for p in 0..producers {
            let tx = tx.clone();
            prods.push(s.spawn(move || {
                let mut rng = Rng::new(100 + p as u64);
                let (rtx, rrx) = mpsc::channel();
                let mut lats = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t0 = Instant::now();
                    let req = Req {
                        deliveries: 1 + (rng.next() & 1) as u8,
                        reply: rtx.clone(),
                    };
                    if tx.send(req).is_err() || rrx.recv().is_err() {
                        break;
                    }
                    lats.push(t0.elapsed());
                }
                lats
            }));
        }
        drop(tx);
        let rd = reader.map(|mut r| {
            s.spawn(move || -> Res<Vec<Duration>> {
                let mut rng = Rng::new(999);
                let mut lats = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let seq = rng.below(committed.load(Ordering::Acquire));
                    let id = id_for(seq);
                    let t0 = Instant::now();
                    let got = r.get(&id)?;
                    lats.push(t0.elapsed());
                    if got.is_none() {
                        return Err(format!("event seq {seq} not found").into());
                    }
                }
                Ok(lats)
            })
        });
        let bodies = ctx.bodies.clone();
        let next_seq = &mut ctx.next_seq;
        let wr = s.spawn(move || -> Res<(u64, u64, Vec<Duration>)> {
            let (mut batches, mut appends) = (0u64, 0u64);
            let mut commit_lats = Vec::new();
            let mut batch: Vec<Rec> = Vec::with_capacity(MAX_BATCH);
            let mut replies = Vec::with_capacity(MAX_BATCH);
            let mut push = |req: Req, batch: &mut Vec<Rec>, replies: &mut Vec<mpsc::Sender<()>>| {
                let seq = *next_seq;
                *next_seq += 1;
                batch.push(Rec {
                    seq,
                    id: id_for(seq),
                    body: bodies[(seq % 64) as usize].clone(),
                    deliveries: req.deliveries,
                });
                replies.push(req.reply);
            };
            while let Ok(first) = rx.recv() {
                push(first, &mut batch, &mut replies);
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(r) => push(r, &mut batch, &mut replies),
                        Err(_) => break,
                    }
                }
                let t0 = Instant::now();
                writer.commit(&batch)?; // durable here
                commit_lats.push(t0.elapsed());
                let last = batch.last().map(|r| r.seq).unwrap_or(0);
                committed.store(last + 1, Ordering::Release);
                if let Some(o) = acks.as_mut() {
                    writeln!(o, "{last}")?;
                    o.flush()?;
                }
                batches += 1;
                appends += batch.len() as u64;
                batch.clear();
                for r in replies.drain(..) {
                    let _ = r.send(());
                }
            }
            Ok((batches, appends, commit_lats))
        });
        std::thread::sleep(dur);
        stop.store(true, Ordering::Relaxed);
        for p in prods {
            out.lats.extend(p.join().expect("producer panicked"));
        }
        let (b, a, cl) = wr.join().expect("writer panicked")?;
        let el = t.elapsed().as_secs_f64();
        out.io = io_now() - io0;
        out.commit_lats = cl;
        out.batches = b;
        out.appends = a;
        out.appends_per_s = a as f64 / el;
        if let Some(rd) = rd {
            out.read_lats = rd.join().expect("reader panicked")?;
            out.reads_per_s = out.read_lats.len() as f64 / el;
        }
        Ok(())
    })?;
    Ok(out)
}

// ------------------------------------------------------------------ raw fsync reference

fn raw_fsync_rate(dir: &Path, dur: Duration) -> Res<f64> {
    let p = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&p)?;
    let buf = [b'x'; 1024];
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed() < dur {
        f.write_all(&buf)?;
        f.sync_data()?;
        n += 1;
    }
    drop(f);
    std::fs::remove_file(&p)?;
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

// ------------------------------------------------------------------ (d) size, (e) kill -9

#[derive(Default, Clone)]
struct Durab {
    load_rate: f64,
    apparent: u64,
    alloc: u64,
    clean_reopen_ms: f64,
    crash_reopen_ms: f64,
    acked: u64,
    lost: u64,
}

/// Open + one lookup (SQLite recovers its WAL lazily, on first access).
fn timed_reopen(
    kind: Kind,
    dir: &Path,
    probe: u64,
    bodies: &Arc<Vec<Arc<[u8]>>>,
) -> Res<(Ctx, f64)> {
    let t = Instant::now();
    let ctx = Ctx::open(kind, dir, bodies.clone())?;
    let found = ctx.store.reader()?.get(&id_for(probe))?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if found.is_none() {
        return Err(format!("{}: seq {probe} missing after reopen", kind.name()).into());
    }
    Ok((ctx, ms))
}

fn size_and_crash(
    kind: Kind,
    dir: &Path,
    n: u64,
    batch: u64,
    crash: Duration,
    bodies: &Arc<Vec<Arc<[u8]>>>,
) -> Res<Durab> {
    let mut d = Durab::default();
    let mut ctx = Ctx::open(kind, dir, bodies.clone())?;
    d.load_rate = ctx.load(n, batch)?;
    drop(ctx);
    (d.apparent, d.alloc) = dir_size(dir);
    let (ctx, ms) = timed_reopen(kind, dir, n - 1, bodies)?;
    d.clean_reopen_ms = ms;
    drop(ctx);

    // A child process group-commits (P=8) and prints each committed seq; kill -9 it.
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args([
            "--child",
            kind.name(),
            &dir.display().to_string(),
            &n.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped");
    let last = Arc::new(AtomicU64::new(u64::MAX));
    let l2 = last.clone();
    let rd = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Ok(v) = line.trim().parse::<u64>() {
                l2.store(v, Ordering::Release);
            }
        }
    });
    // Wait for the child to start acknowledging, then let it run `crash`.
    let t = Instant::now();
    while last.load(Ordering::Acquire) == u64::MAX && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(crash);
    child.kill()?; // SIGKILL
    child.wait()?;
    rd.join().ok();
    let acked_last = last.load(Ordering::Acquire);
    if acked_last == u64::MAX {
        return Err(format!("{}: child never acknowledged", kind.name()).into());
    }
    let (ctx, ms) = timed_reopen(kind, dir, acked_last, bodies)?;
    d.crash_reopen_ms = ms;
    d.acked = acked_last + 1 - n;
    let mut r = ctx.store.reader()?;
    for seq in n..=acked_last {
        if r.get(&id_for(seq))?.is_none() {
            d.lost += 1;
        }
    }
    Ok(d)
}

fn child_main(args: &[String]) -> Res<()> {
    let kind = Kind::parse(&args[0]).ok_or("bad kind")?;
    let dir = PathBuf::from(&args[1]);
    let start: u64 = args[2].parse()?;
    let mut ctx = Ctx::open(kind, &dir, Arc::new(body_pool()))?;
    ctx.next_seq = start;
    scen_group(
        &mut ctx,
        8,
        Duration::from_secs(3600),
        false,
        Some(std::io::stdout()),
    )?;
    Ok(())
}

// ------------------------------------------------------------------ main

struct Opts {
    secs: f64,
    rounds: usize,
    preload: u64,
    size_n: u64,
    size_batch: u64,
    crash_secs: f64,
    stores: Vec<Kind>,
    dir: PathBuf,
    keep: bool,
}

fn parse_opts() -> Res<Opts> {
    let mut o = Opts {
        secs: 0.75,
        rounds: 6,
        preload: 20_000,
        size_n: 50_000,
        size_batch: 64,
        crash_secs: 1.0,
        stores: Kind::ALL.to_vec(),
        dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/tmp"),
        keep: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--secs" => o.secs = val()?.parse()?,
            "--rounds" => o.rounds = val()?.parse()?,
            "--preload" => o.preload = val()?.parse()?,
            "--size-n" => o.size_n = val()?.parse()?,
            "--size-batch" => o.size_batch = val()?.parse()?,
            "--crash-secs" => o.crash_secs = val()?.parse()?,
            "--dir" => o.dir = PathBuf::from(val()?),
            "--stores" => {
                o.stores = val()?
                    .split(',')
                    .map(|s| Kind::parse(s).ok_or_else(|| format!("unknown store {s}")))
                    .collect::<Result<_, _>>()?
            }
            "--keep" => o.keep = true,
            "-h" | "--help" => {
                println!(
                    "{}",
                    include_str!("main.rs")
                        .lines()
                        .take(15)
                        .map(|l| l.trim_start_matches("//!").trim_start_matches(' '))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {a}").into()),
        }
    }
    Ok(o)
}

#[derive(Default)]
struct Grp {
    rate: Vec<f64>,
    lats: Vec<Duration>,
    batches: u64,
    appends: u64,
    commit_lats: Vec<Duration>,
    io: Io,
}

#[derive(Default)]
struct Acc {
    seq_rate: Vec<f64>,
    seq_lats: Vec<Duration>,
    seq_io: Io,
    grp: [Grp; 3],
    reads: Vec<f64>,
    read_lats: Vec<Duration>,
    rw_appends: Vec<f64>,
}

fn main() -> Res<()> {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("--child") {
        return child_main(&argv[2..]);
    }
    let o = parse_opts()?;
    let run_dir = o.dir.join(format!("run-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir)?;
    {
        use std::os::unix::fs::MetadataExt;
        let d = std::fs::metadata(&run_dir)?.dev();
        let maj = ((d >> 8) & 0xfff) | ((d >> 32) & !0xfff);
        let min = (d & 0xff) | ((d >> 12) & !0xff);
        let _ = DEV.set((maj, min));
    }
    let dur = Duration::from_secs_f64(o.secs);
    let bodies = Arc::new(body_pool());
    let t_all = Instant::now();
    eprintln!(
        "store-compare: {} stores, {} rounds x {}s cells, scratch {}",
        o.stores.len(),
        o.rounds,
        o.secs,
        run_dir.display()
    );

    let mut ctxs = Vec::new();
    for &k in &o.stores {
        let mut c = Ctx::open(k, &run_dir.join(k.name()), bodies.clone())?;
        c.load(o.preload, 500)?;
        ctxs.push(c);
    }
    eprintln!(
        "preloaded {} events each ({:.1}s)",
        o.preload,
        t_all.elapsed().as_secs_f64()
    );

    let mut acc: Vec<Acc> = o.stores.iter().map(|_| Acc::default()).collect();
    let mut fsync = Vec::new();
    const PS: [usize; 3] = [1, 8, 64];
    for round in 0..o.rounds {
        fsync.push(raw_fsync_rate(&run_dir, Duration::from_millis(500))?);
        let n = ctxs.len();
        let order: Vec<usize> = (0..n).map(|i| (i + round) % n).collect();
        for scen in 0..5 {
            for &i in &order {
                let c = &mut ctxs[i];
                let a = &mut acc[i];
                match scen {
                    0 => {
                        let (r, l, io) = scen_sequential(c, dur)?;
                        a.seq_rate.push(r);
                        a.seq_lats.extend(l);
                        a.seq_io += io;
                    }
                    1..=3 => {
                        let g = scen_group(c, PS[scen - 1], dur, false, None)?;
                        let e = &mut a.grp[scen - 1];
                        e.rate.push(g.appends_per_s);
                        e.lats.extend(g.lats);
                        e.batches += g.batches;
                        e.appends += g.appends;
                        e.commit_lats.extend(g.commit_lats);
                        e.io += g.io;
                    }
                    _ => {
                        let g = scen_group(c, 8, dur, true, None)?;
                        a.reads.push(g.reads_per_s);
                        a.read_lats.extend(g.read_lats);
                        a.rw_appends.push(g.appends_per_s);
                    }
                }
            }
        }
        eprintln!(
            "round {} done ({:.0}s)",
            round + 1,
            t_all.elapsed().as_secs_f64()
        );
    }
    drop(ctxs);

    let mut dur_res = Vec::new();
    for &k in &o.stores {
        let d = size_and_crash(
            k,
            &run_dir.join(format!("{}-size", k.name())),
            o.size_n,
            o.size_batch,
            Duration::from_secs_f64(o.crash_secs),
            &bodies,
        )?;
        dur_res.push(d);
    }
    eprintln!(
        "size + kill -9 phase done ({:.0}s total)",
        t_all.elapsed().as_secs_f64()
    );

    // ------------------------------------------------------------ report
    let med = |v: &[f64]| -> f64 {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        if v.is_empty() {
            f64::NAN
        } else {
            v[v.len() / 2]
        }
    };
    let rate = |v: &[f64]| -> String {
        let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = v.iter().cloned().fold(0.0, f64::max);
        if v.len() > 1 {
            format!("{:.0} ({:.0}–{:.0})", med(v), lo, hi)
        } else {
            format!("{:.0}", med(v))
        }
    };
    let lat = |v: &mut Vec<Duration>| -> String {
        v.sort();
        format!("{:.2} / {:.2}", pct(v, 0.5), pct(v, 0.99))
    };

    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let mut row = |name: &str, f: &mut dyn FnMut(usize) -> String| {
        let cells = (0..o.stores.len()).map(&mut *f).collect();
        rows.push((name.to_string(), cells));
    };
    row("(a) 1 append/tx, sequential: commits/s", &mut |i| {
        rate(&acc[i].seq_rate)
    });
    row("(a) commit latency p50 / p99 ms", &mut |i| {
        lat(&mut acc[i].seq_lats)
    });
    row("(a) device write I/Os / flushes per commit", &mut |i| {
        let (io, n) = (acc[i].seq_io, acc[i].seq_lats.len().max(1) as f64);
        format!("{:.1} / {:.1}", io.writes as f64 / n, io.flushes as f64 / n)
    });
    for (j, p) in PS.iter().enumerate() {
        row(&format!("(b) group commit P={p}: appends/s"), &mut |i| {
            rate(&acc[i].grp[j].rate)
        });
        row(
            &format!("(b) P={p}: append latency p50 / p99 ms"),
            &mut |i| lat(&mut acc[i].grp[j].lats),
        );
        row(
            &format!("(b) P={p}: mean batch · commit p50 ms"),
            &mut |i| {
                let g = &mut acc[i].grp[j];
                g.commit_lats.sort();
                format!(
                    "{:.1} · {:.2}",
                    g.appends as f64 / g.batches.max(1) as f64,
                    pct(&g.commit_lats, 0.5)
                )
            },
        );
        row(
            &format!("(b) P={p}: device write I/Os per commit · KiB written per append"),
            &mut |i| {
                let g = &acc[i].grp[j];
                format!(
                    "{:.1} · {:.1}",
                    g.io.writes as f64 / g.batches.max(1) as f64,
                    g.io.sectors as f64 * 512.0 / 1024.0 / g.appends.max(1) as f64
                )
            },
        );
    }
    row(
        "(c) point reads/s by id, 1 reader, while P=8 writes",
        &mut |i| rate(&acc[i].reads),
    );
    row("(c) read latency p50 / p99 ms", &mut |i| {
        lat(&mut acc[i].read_lats)
    });
    row("(c) appends/s meanwhile", &mut |i| rate(&acc[i].rw_appends));
    let n = o.size_n;
    row(
        &format!("(d) on disk after {n} appends, MiB (allocated)"),
        &mut |i| format!("{:.1}", dur_res[i].alloc as f64 / 1048576.0),
    );
    row("(d) bytes per append (allocated / apparent)", &mut |i| {
        format!(
            "{:.0} / {:.0}",
            dur_res[i].alloc as f64 / n as f64,
            dur_res[i].apparent as f64 / n as f64
        )
    });
    row(
        &format!("(d) load at {} appends/commit: appends/s", o.size_batch),
        &mut |i| format!("{:.0}", dur_res[i].load_rate),
    );
    row("(e) reopen + first read after clean close, ms", &mut |i| {
        format!("{:.1}", dur_res[i].clean_reopen_ms)
    });
    row("(e) reopen + first read after kill -9, ms", &mut |i| {
        format!("{:.1}", dur_res[i].crash_reopen_ms)
    });
    row("(e) acked before kill -9 / lost after", &mut |i| {
        format!("{} / {}", dur_res[i].acked, dur_res[i].lost)
    });

    println!();
    print!("| scenario |");
    for k in &o.stores {
        print!(" {} |", k.title());
    }
    println!();
    print!("| --- |");
    for _ in &o.stores {
        print!(" ---: |");
    }
    println!();
    for (name, cells) in rows {
        print!("| {name} |");
        for c in cells {
            print!(" {c} |");
        }
        println!();
    }
    println!();
    println!(
        "Throughput cells: median (min–max) over {} interleaved rounds of {}s; latencies pooled over rounds. \
         Raw 1 KiB write+fdatasync on this disk: {} /s. Preload {} events per store. \
         {} cores, kernel {}. Total runtime {:.0}s.",
        o.rounds,
        o.secs,
        rate(&fsync),
        o.preload,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        t_all.elapsed().as_secs_f64()
    );
    if !o.keep {
        std::fs::remove_dir_all(&run_dir)?;
    }
    Ok(())
}
