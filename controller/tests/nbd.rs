//! The NBD export (DESIGN §9) driven by real clients — nbdinfo, qemu-nbd, qemu-io, qemu-img,
//! nbdcopy and fio's `nbd` engine — against a 2-node cluster of real daemons, and by a raw
//! client that sends what no well-behaved client would (each hostile case is a test: the
//! server answers with an NBD error or disconnects cleanly, never panics, never applies part
//! of a write, and goes on serving other connections).
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use common::{Cluster, Settings};
use controller::nbd::codec::{self, Errno, Reply, RequestHeader};

const MIB: u64 = 1 << 20;

/// Runs a client; its stdout, or a failure with everything it printed.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} cannot start ({e}); .ci/run installs the NBD clients"));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{program} {args:?} failed: {}\n{stdout}\n{stderr}", out.status);
    stdout
}

/// A cluster with `vol_a` of `size` bytes at A.
async fn cluster(size: u64) -> Cluster {
    let settings = Settings { nvlog_mib: 64, ..Settings::default() };
    let mut cluster = Cluster::new(&settings);
    cluster.start(0);
    cluster.start(1);
    cluster.wait_state(0, "serving").await;
    cluster.create_volume_on(0, size + 64 * MIB, size).await;
    cluster
}

/// Checks the daemon is still up and serving, and that it did not panic.
async fn still_serving(cluster: &Cluster) {
    cluster.wait_state(0, "serving").await;
    assert!(!cluster.log(0).contains("panicked"), "{}", cluster.log(0));
}

#[tokio::test]
async fn nbdinfo_and_qemu_nbd_list_describe_the_export() {
    let cluster = cluster(64 * MIB).await;
    let uri = cluster.nbd_uri(0, "vol_a");
    let json = run("nbdinfo", &["--json", &uri]);
    let info: serde_json::Value = serde_json::from_str(&json).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["export-name"], "vol_a");
    assert_eq!(export["export-size"], 64 * MIB);
    for flag in ["can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"] {
        assert_eq!(export[flag], true, "{flag} in {json}");
    }
    assert_eq!(export["is_read_only"], false);
    assert_eq!(export["block_size_minimum"], 1);
    assert_eq!(export["block_size_preferred"], 4096);
    assert_eq!(export["block_size_maximum"], 32 * MIB);
    assert_eq!(info["protocol"], "newstyle-fixed");

    let list = run("nbdinfo", &["--list", "--json", &format!("nbd://{}", cluster.nbd_address(0))]);
    assert!(list.contains("\"vol_a\""), "{list}");
    let (host, port) =
        cluster.nbd_address(0).split_once(':').map(|(h, p)| (h.to_string(), p.to_string())).unwrap();
    let listed = run("qemu-nbd", &["--list", "--bind", &host, "--port", &port]);
    assert!(listed.contains("vol_a") && listed.contains(&(64 * MIB).to_string()), "{listed}");
    still_serving(&cluster).await;
}

#[tokio::test]
async fn qemu_io_writes_reads_flushes_discards_and_zeroes() {
    let cluster = cluster(64 * MIB).await;
    let uri = cluster.nbd_uri(0, "vol_a");
    let script = [
        "write -P 0xab 0 1M",
        "read -P 0xab 0 1M",
        "write -P 0x11 4097 100",
        "read -P 0x11 4097 100",
        "read -P 0xab 4096 1",
        "read -P 0xab 4197 3995",
        "write -P 0x5a 32M 32M",
        "read -P 0x5a 32M 32M",
        "flush",
        "write -P 0x22 -f 2M 64k",
        "read -P 0x22 2M 64k",
        "discard 0 64k",
        "read -P 0 0 64k",
        "read -P 0xab 64k 4k",
        "write -z 1M 128k",
        "read -P 0 1M 128k",
        "write -z -u 40M 1M",
        "read -P 0 40M 1M",
        "read -P 0x5a 41M 1M",
    ];
    let mut args = vec!["-f", "raw"];
    for command in &script {
        args.extend(["-c", command]);
    }
    args.push(&uri);
    let out = run("qemu-io", &args);
    assert!(!out.contains("failed") && !out.contains("error"), "{out}");
    assert_eq!(out.matches("read ").count(), 11, "{out}");
    // The same from a second connection (multi-conn: completed writes are seen everywhere).
    let out = run("qemu-io", &["-f", "raw", "-c", "read -P 0x22 2M 64k", "-c", "read -P 0 1M 128k", &uri]);
    assert!(!out.contains("failed"), "{out}");
    still_serving(&cluster).await;
}

#[tokio::test]
async fn bulk_copies_in_and_out_are_identical() {
    let cluster = cluster(256 * MIB).await;
    let uri = cluster.nbd_uri(0, "vol_a");
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let source = dir.path().join("source.img");
    {
        // 256 MiB that is not all zero anywhere (so nothing is skipped as sparse), in a
        // pattern that differs per 4 KiB.
        let mut file = std::fs::File::create(&source).unwrap();
        let mut block = vec![0u8; 4096];
        for i in 0..(256 * MIB / 4096) {
            for (j, chunk) in block.chunks_mut(8).enumerate() {
                chunk.copy_from_slice(&(i * 0x9e37_79b9 + j as u64 + 1).to_le_bytes());
            }
            file.write_all(&block).unwrap();
        }
    }
    let source = source.to_str().unwrap();
    // qemu-img: in, compare through NBD.
    run("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", "-S", "0", "-m", "8", source, &uri]);
    run("qemu-img", &["compare", "-f", "raw", "-F", "raw", source, &uri]);
    // nbdcopy out with 32 MiB requests, and in again over 4 connections after a wipe.
    let out = dir.path().join("out.img");
    let out = out.to_str().unwrap();
    run("nbdcopy", &["--request-size=33554432", &uri, out]);
    run("cmp", &[source, out]);
    run("qemu-io", &["-f", "raw", "-c", "write -z 0 256M", &uri]);
    let zeroes = run("qemu-io", &["-f", "raw", "-c", "read -P 0 255M 1M", &uri]);
    assert!(!zeroes.contains("failed"), "{zeroes}");
    run("nbdcopy", &["--request-size=33554432", "--connections=4", source, &uri]);
    run("qemu-img", &["compare", "-f", "raw", "-F", "raw", source, &uri]);
    still_serving(&cluster).await;
}

#[tokio::test]
async fn fio_verifies_crc32c_at_queue_depth_32() {
    let cluster = cluster(64 * MIB).await;
    let uri = cluster.nbd_uri(0, "vol_a");
    let out = run(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=32m",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            // No verify state file in the working directory.
            "--verify_state_save=0",
            "--output-format=json",
        ],
    );
    let json = &out[out.find('{').unwrap()..];
    let result: serde_json::Value = serde_json::from_str(json).unwrap();
    let job = &result["jobs"][0];
    assert_eq!(job["error"], 0, "{json}");
    assert_eq!(job["write"]["io_bytes"], 32 * MIB, "{json}");
    assert_eq!(job["read"]["io_bytes"], 32 * MIB, "every block read back and verified: {json}");
    still_serving(&cluster).await;
}

/// A client that does what it is told, byte by byte.
struct RawClient {
    stream: TcpStream,
}

impl RawClient {
    /// Connects and reads the greeting.
    fn connect(address: &str) -> RawClient {
        let stream = TcpStream::connect(address).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut client = RawClient { stream };
        let greeting = client.read_n(18);
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        client
    }

    /// Connects, negotiates `NBD_OPT_GO` on `name` (structured replies or not).
    fn go(address: &str, name: &str, structured: bool) -> RawClient {
        let mut client = RawClient::connect(address);
        client.send(&3u32.to_be_bytes());
        if structured {
            client.option(codec::OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(client.option_reply().1, codec::REP_ACK);
        }
        let mut data = Vec::new();
        data.put_u32(name.len() as u32);
        data.put_slice(name.as_bytes());
        data.put_u16(0);
        client.option(codec::OPT_GO, &data);
        loop {
            let (_, kind, _) = client.option_reply();
            match kind {
                codec::REP_INFO => {}
                codec::REP_ACK => return client,
                other => panic!("GO answered {other:#x}"),
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        self.stream.read_exact(&mut buf).unwrap();
        buf
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut out = Vec::new();
        out.put_u64(codec::IHAVEOPT);
        out.put_u32(option);
        out.put_u32(data.len() as u32);
        out.put_slice(data);
        self.send(&out);
    }

    /// (option, reply type, data).
    fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let header = self.read_n(20);
        assert_eq!(u64::from_be_bytes(header[..8].try_into().unwrap()), codec::OPTION_REPLY_MAGIC);
        let option = u32::from_be_bytes(header[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(header[12..16].try_into().unwrap());
        let length = u32::from_be_bytes(header[16..20].try_into().unwrap());
        (option, kind, self.read_n(length as usize))
    }

    fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, length: u32, payload: &[u8]) {
        let mut out = BytesMut::new();
        codec::encode_request(&mut out, &RequestHeader { flags, kind, cookie, offset, length });
        out.put_slice(payload);
        self.send(&out);
    }

    /// The next simple reply: (error, cookie), and `data` bytes after it on success.
    fn simple_reply(&mut self, data: usize) -> (u32, u64, Vec<u8>) {
        let header = self.read_n(16);
        let Some((Reply::Simple { error, cookie }, 16)) = codec::parse_reply(&header).unwrap() else {
            panic!("not a simple reply: {header:?}")
        };
        let data = if error == 0 { self.read_n(data) } else { Vec::new() };
        (error, cookie, data)
    }

    /// The next structured chunk.
    fn chunk(&mut self) -> Reply {
        let mut buf = self.read_n(20);
        let length = u32::from_be_bytes(buf[16..20].try_into().unwrap()) as usize;
        buf.extend(self.read_n(length));
        codec::parse_reply(&buf).unwrap().unwrap().0
    }

    /// Whether the server closed the connection (EOF) within the read timeout.
    fn closed(&mut self) -> bool {
        let mut buf = [0u8; 1];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(e) => panic!("the server neither answered nor closed: {e}"),
            }
        }
    }
}

/// A write and its read back through a fresh connection: the server still serves.
fn still_works(address: &str) {
    let mut client = RawClient::go(address, "vol_a", false);
    client.request(codec::CMD_WRITE, 0, 1, 8192, 4, b"live");
    assert_eq!(client.simple_reply(0).0, 0);
    client.request(codec::CMD_READ, 0, 2, 8192, 4, &[]);
    assert_eq!(client.simple_reply(4), (0, 2, b"live".to_vec()));
    client.request(codec::CMD_DISC, 0, 3, 0, 0, &[]);
    assert!(client.closed());
}

#[tokio::test]
async fn a_bad_request_magic_disconnects_cleanly() {
    let cluster = cluster(4 * MIB).await;
    let address = cluster.nbd_address(0);
    let mut client = RawClient::go(&address, "vol_a", false);
    client.send(&[0xde; 28]);
    assert!(client.closed());
    // And during negotiation: a bad option magic.
    let mut client = RawClient::connect(&address);
    client.send(&3u32.to_be_bytes());
    client.send(&[0xad; 16]);
    assert!(client.closed());
    still_works(&address);
    still_serving(&cluster).await;
}

#[tokio::test]
async fn out_of_range_requests_get_errors() {
    let cluster = cluster(4 * MIB).await;
    let address = cluster.nbd_address(0);
    let mut client = RawClient::go(&address, "vol_a", false);
    client.request(codec::CMD_READ, 0, 1, 4 * MIB - 1, 2, &[]);
    assert_eq!(client.simple_reply(0).0, Errno::Inval as u32);
    client.request(codec::CMD_READ, 0, 2, u64::MAX - 1, 4096, &[]);
    assert_eq!(client.simple_reply(0).0, Errno::Inval as u32);
    // A write past the end: its payload is consumed and nothing is written.
    client.request(codec::CMD_WRITE, 0, 3, 4 * MIB - 2, 4, b"tail");
    assert_eq!(client.simple_reply(0).0, Errno::NoSpc as u32);
    client.request(codec::CMD_TRIM, 0, 4, 4 * MIB, 1, &[]);
    assert_eq!(client.simple_reply(0).0, Errno::NoSpc as u32);
    client.request(codec::CMD_READ, 0, 5, 4 * MIB - 2, 2, &[]);
    assert_eq!(client.simple_reply(2), (0, 5, vec![0, 0]));
    still_works(&address);
    still_serving(&cluster).await;
}

#[tokio::test]
async fn oversize_requests_get_errors_or_a_clean_disconnect() {
    let cluster = cluster(64 * MIB).await;
    let address = cluster.nbd_address(0);
    // A read above 32 MiB is refused (structured: an error chunk, never data).
    let mut client = RawClient::go(&address, "vol_a", true);
    client.request(codec::CMD_READ, 0, 1, 0, 32 * MIB as u32 + 1, &[]);
    let Reply::Chunk { kind, cookie, payload, .. } = client.chunk() else { panic!() };
    assert_eq!((kind, cookie), (codec::REPLY_TYPE_ERROR, 1));
    assert_eq!(u32::from_be_bytes(payload[..4].try_into().unwrap()), Errno::Overflow as u32);
    // A write above 32 MiB cannot be skipped: an error, then the connection ends.
    client.request(codec::CMD_WRITE, 0, 2, 0, 64 * MIB as u32, &[0x77; 4096]);
    let Reply::Chunk { kind, cookie, .. } = client.chunk() else { panic!() };
    assert_eq!((kind, cookie), (codec::REPLY_TYPE_ERROR, 2));
    assert!(client.closed());
    // Nothing of it landed.
    let mut client = RawClient::go(&address, "vol_a", false);
    client.request(codec::CMD_READ, 0, 3, 0, 4096, &[]);
    assert_eq!(client.simple_reply(4096), (0, 3, vec![0; 4096]));
    still_serving(&cluster).await;
}

#[tokio::test]
async fn unknown_commands_and_flags_get_einval() {
    let cluster = cluster(4 * MIB).await;
    let address = cluster.nbd_address(0);
    let mut client = RawClient::go(&address, "vol_a", false);
    for (cookie, kind, flags) in
        [(1, 5u16, 0u16), (2, 7, 0), (3, 0x4242, 0), (4, codec::CMD_WRITE_ZEROES, 1 << 4)]
    {
        client.request(kind, flags, cookie, 0, 4096, &[]);
        assert_eq!(
            client.simple_reply(0),
            (Errno::Inval as u32, cookie, vec![]),
            "command {kind} flags {flags}"
        );
    }
    still_works(&address);
    still_serving(&cluster).await;
}

#[tokio::test]
async fn an_over_long_export_name_is_refused() {
    let cluster = cluster(4 * MIB).await;
    let address = cluster.nbd_address(0);
    let mut client = RawClient::connect(&address);
    client.send(&3u32.to_be_bytes());
    let name = vec![b'v'; 5000];
    let mut data = Vec::new();
    data.put_u32(name.len() as u32);
    data.put_slice(&name);
    data.put_u16(0);
    client.option(codec::OPT_GO, &data);
    let (option, kind, message) = client.option_reply();
    assert_eq!(
        (option, kind),
        (codec::OPT_GO, codec::REP_ERR_INVALID),
        "{}",
        String::from_utf8_lossy(&message)
    );
    // An unknown name gets NBD_REP_ERR_UNKNOWN naming what is exported; the negotiation goes on.
    let mut data = Vec::new();
    data.put_u32(4);
    data.put_slice(b"nope");
    data.put_u16(0);
    client.option(codec::OPT_GO, &data);
    let (_, kind, message) = client.option_reply();
    assert_eq!(kind, codec::REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&message).contains("vol_a"), "{}", String::from_utf8_lossy(&message));
    // An option longer than any of ours: a clean disconnect.
    let mut header = Vec::new();
    header.put_u64(codec::IHAVEOPT);
    header.put_u32(codec::OPT_EXPORT_NAME);
    header.put_u32(1 << 30);
    client.send(&header);
    assert!(client.closed());
    // NBD_OPT_EXPORT_NAME of an unknown name closes (it cannot carry an error).
    let mut client = RawClient::connect(&address);
    client.send(&3u32.to_be_bytes());
    client.option(codec::OPT_EXPORT_NAME, b"nope");
    assert!(client.closed());
    still_works(&address);
    still_serving(&cluster).await;
}

#[tokio::test]
async fn a_close_in_the_middle_of_a_payload_applies_nothing() {
    let cluster = cluster(4 * MIB).await;
    let address = cluster.nbd_address(0);
    {
        let mut client = RawClient::go(&address, "vol_a", false);
        client.request(codec::CMD_WRITE, 0, 1, 0, 8192, &[0x11; 8192]);
        assert_eq!(client.simple_reply(0).0, 0);
        // 1 MiB announced, half of it sent, then the connection is gone.
        client.request(codec::CMD_WRITE, 0, 2, 0, MIB as u32, &vec![0x99; (MIB / 2) as usize]);
    }
    // The server is done with the cut connection (and anything it would have applied from it)
    // once it no longer counts it.
    wait_connections(&cluster, 0).await;
    let mut client = RawClient::go(&address, "vol_a", false);
    client.request(codec::CMD_READ, 0, 3, 0, 8192, &[]);
    assert_eq!(client.simple_reply(8192), (0, 3, vec![0x11; 8192]), "part of a cut write was applied");
    still_serving(&cluster).await;
}

/// Waits until node A has `n` NBD connections open.
async fn wait_connections(cluster: &Cluster, n: u64) {
    let started = std::time::Instant::now();
    let want = format!("controller_nbd_connections {n}");
    loop {
        if cluster.scrape(0).lines().any(|line| line == want) {
            return;
        }
        assert!(started.elapsed() < common::DEADLINE, "node A never had {n} NBD connections open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_client_without_fixed_newstyle_is_disconnected() {
    let cluster = cluster(4 * MIB).await;
    let address = cluster.nbd_address(0);
    let mut client = RawClient::connect(&address);
    client.send(&0u32.to_be_bytes());
    assert!(client.closed());
    let mut client = RawClient::connect(&address);
    client.send(&0x8000_0001u32.to_be_bytes());
    assert!(client.closed());
    still_works(&address);
    still_serving(&cluster).await;
}

/// Many requests in flight on one connection, answered by cookie (in any order), and seen by
/// another connection once answered (multi-conn).
#[tokio::test]
async fn pipelined_requests_are_all_answered_and_seen_by_other_connections() {
    let cluster = cluster(16 * MIB).await;
    let address = cluster.nbd_address(0);
    let mut writer = RawClient::go(&address, "vol_a", true);
    let count = 256u64;
    let mut out = BytesMut::new();
    for i in 0..count {
        codec::encode_request(
            &mut out,
            &RequestHeader { flags: 0, kind: codec::CMD_WRITE, cookie: i, offset: i * 8192, length: 4096 },
        );
        out.put_bytes((i % 251) as u8 + 1, 4096);
    }
    writer.send(&out);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..count {
        match writer.simple_reply_or_chunk() {
            (0, cookie) => assert!(seen.insert(cookie)),
            (error, cookie) => panic!("write {cookie} failed with {error}"),
        }
    }
    assert_eq!(seen.len() as u64, count);
    let mut reader = RawClient::go(&address, "vol_a", false);
    for i in 0..count {
        reader.request(codec::CMD_READ, 0, i, i * 8192, 4096, &[]);
    }
    for _ in 0..count {
        let (error, cookie, data) = reader.simple_reply(4096);
        assert_eq!(error, 0);
        assert_eq!(data, vec![(cookie % 251) as u8 + 1; 4096], "block {cookie}");
    }
    still_serving(&cluster).await;
}

impl RawClient {
    /// The next reply of a write on a structured connection: (error, cookie).
    fn simple_reply_or_chunk(&mut self) -> (u32, u64) {
        let header = self.read_n(4);
        let magic = u32::from_be_bytes(header[..4].try_into().unwrap());
        if magic == codec::SIMPLE_REPLY_MAGIC {
            let rest = self.read_n(12);
            let error = u32::from_be_bytes(rest[..4].try_into().unwrap());
            return (error, u64::from_be_bytes(rest[4..12].try_into().unwrap()));
        }
        let mut buf = header;
        buf.extend(self.read_n(16));
        let length = u32::from_be_bytes(buf[16..20].try_into().unwrap()) as usize;
        buf.extend(self.read_n(length));
        let Some((Reply::Chunk { kind, cookie, payload, .. }, _)) = codec::parse_reply(&buf).unwrap() else {
            panic!()
        };
        let error = if kind == codec::REPLY_TYPE_ERROR {
            u32::from_be_bytes(payload[..4].try_into().unwrap())
        } else {
            0
        };
        (error, cookie)
    }
}
