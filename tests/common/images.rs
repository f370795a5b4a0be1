//! Test images built from scratch as OCI layouts: real tar layers (gzip framing with stored
//! deflate blocks, so pushing does not recompress and digests are stable), configs, manifests and
//! a multi-platform index. Pushed to the upstream registry with skopeo.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::json;
use sha2::{Digest as _, Sha256};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// A built image manifest and what it references.
#[derive(Clone, Debug)]
pub struct Image {
    pub manifest_digest: String,
    pub manifest_size: usize,
    pub config_digest: String,
    pub layers: Vec<(String, u64)>,
    pub architecture: String,
}

impl Image {
    /// Every blob digest (config and layers).
    pub fn blobs(&self) -> Vec<String> {
        let mut blobs = vec![self.config_digest.clone()];
        blobs.extend(self.layers.iter().map(|(d, _)| d.clone()));
        blobs
    }
}

/// An OCI image layout directory being filled.
pub struct Layout {
    pub dir: PathBuf,
    tagged: Vec<serde_json::Value>,
}

impl Layout {
    pub fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Self {
            dir: dir.to_owned(),
            tagged: Vec::new(),
        }
    }

    fn put_blob(&self, bytes: &[u8]) -> String {
        let hex = hex::encode(Sha256::digest(bytes));
        std::fs::write(self.dir.join("blobs/sha256").join(&hex), bytes).unwrap();
        format!("sha256:{hex}")
    }

    /// A single-platform image whose layers hold pseudo-random files of `layer_sizes` bytes.
    pub fn image(&mut self, architecture: &str, layer_sizes: &[usize], seed: u64) -> Image {
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        for (i, size) in layer_sizes.iter().enumerate() {
            let (digest, length, diff_id) =
                self.layer(&format!("layer-{i}.bin"), *size, seed * 1000 + i as u64);
            layers.push((digest, length));
            diff_ids.push(diff_id);
        }
        let config = json!({
            "architecture": architecture,
            "os": "linux",
            "config": {"Cmd": ["/bin/true"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let config_bytes = serde_json::to_vec(&config).unwrap();
        let config_digest = self.put_blob(&config_bytes);
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": CONFIG, "digest": config_digest, "size": config_bytes.len()},
            "layers": layers.iter().map(|(d, s)| json!({"mediaType": LAYER_GZIP, "digest": d, "size": s})).collect::<Vec<_>>(),
        });
        let manifest_bytes = serde_json::to_vec(&manifest).unwrap();
        let manifest_digest = self.put_blob(&manifest_bytes);
        Image {
            manifest_digest,
            manifest_size: manifest_bytes.len(),
            config_digest,
            layers,
            architecture: architecture.to_owned(),
        }
    }

    /// Writes a gzip-framed tar layer with one file, streaming; returns (digest, size, diff_id).
    fn layer(&self, file_name: &str, size: usize, seed: u64) -> (String, u64, String) {
        let tmp = self.dir.join(format!("blobs/sha256/.building-{seed}"));
        let mut out = StoredGzip::new(File::create(&tmp).unwrap());
        let mut header = [0u8; 512];
        let name = format!("data/{file_name}");
        header[..name.len()].copy_from_slice(name.as_bytes());
        write_octal(&mut header[100..108], 0o644);
        write_octal(&mut header[108..116], 0);
        write_octal(&mut header[116..124], 0);
        write_octal(&mut header[124..136], size as u64);
        write_octal(&mut header[136..148], 1_700_000_000);
        header[156] = b'0';
        header[257..263].copy_from_slice(b"ustar\0");
        header[263..265].copy_from_slice(b"00");
        header[148..156].copy_from_slice(b"        ");
        let checksum: u32 = header.iter().map(|b| *b as u32).sum();
        write_octal(&mut header[148..155], checksum as u64);
        header[155] = b' ';
        out.write(&header);
        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut remaining = size;
        let mut chunk = vec![0u8; 1 << 20];
        while remaining > 0 {
            let n = remaining.min(chunk.len());
            for word in chunk[..n].chunks_mut(8) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let bytes = rng.to_le_bytes();
                word.copy_from_slice(&bytes[..word.len()]);
            }
            out.write(&chunk[..n]);
            remaining -= n;
        }
        let padding = (512 - size % 512) % 512;
        out.write(&vec![0u8; padding + 1024]);
        let (digest, length, diff_id) = out.finish();
        std::fs::rename(
            &tmp,
            self.dir
                .join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:")),
        )
        .unwrap();
        (digest, length, diff_id)
    }

    /// Tags a single image in `index.json`.
    pub fn tag_image(&mut self, tag: &str, image: &Image) {
        self.tagged.push(json!({
            "mediaType": OCI_MANIFEST,
            "digest": image.manifest_digest,
            "size": image.manifest_size,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }));
    }

    /// Builds an index over `images` (one per platform) and tags it; returns its digest.
    pub fn tag_index(&mut self, tag: &str, images: &[Image]) -> String {
        let index = json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": images.iter().map(|image| json!({
                "mediaType": OCI_MANIFEST,
                "digest": image.manifest_digest,
                "size": image.manifest_size,
                "platform": {"architecture": image.architecture, "os": "linux"},
            })).collect::<Vec<_>>(),
        });
        let bytes = serde_json::to_vec(&index).unwrap();
        let digest = self.put_blob(&bytes);
        self.tagged.push(json!({
            "mediaType": OCI_INDEX,
            "digest": digest,
            "size": bytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }));
        digest
    }

    pub fn write_index(&self) {
        let index = json!({"schemaVersion": 2, "manifests": self.tagged});
        std::fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
    }
}

fn write_octal(field: &mut [u8], value: u64) {
    let text = format!("{:0width$o}\0", value, width = field.len() - 1);
    field.copy_from_slice(text.as_bytes());
}

/// gzip with stored (uncompressed) deflate blocks: valid gzip, no compression CPU, and hashes of
/// both the compressed stream (the blob digest) and the raw tar (the diff_id).
struct StoredGzip {
    file: File,
    crc: u32,
    raw_len: u64,
    raw_hash: Sha256,
    blob_hash: Sha256,
    blob_len: u64,
    pending: Vec<u8>,
}

impl StoredGzip {
    fn new(file: File) -> Self {
        let mut this = Self {
            file,
            crc: 0xFFFF_FFFF,
            raw_len: 0,
            raw_hash: Sha256::new(),
            blob_hash: Sha256::new(),
            blob_len: 0,
            pending: Vec::new(),
        };
        this.emit(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255]);
        this
    }

    fn emit(&mut self, bytes: &[u8]) {
        self.blob_hash.update(bytes);
        self.blob_len += bytes.len() as u64;
        self.file.write_all(bytes).unwrap();
    }

    fn write(&mut self, bytes: &[u8]) {
        self.raw_hash.update(bytes);
        self.raw_len += bytes.len() as u64;
        for byte in bytes {
            self.crc = CRC_TABLE[((self.crc ^ *byte as u32) & 0xff) as usize] ^ (self.crc >> 8);
        }
        self.pending.extend_from_slice(bytes);
        while self.pending.len() > 65_535 {
            let block: Vec<u8> = self.pending.drain(..65_535).collect();
            self.block(&block, false);
        }
    }

    fn block(&mut self, data: &[u8], last: bool) {
        let len = data.len() as u16;
        let mut header = vec![u8::from(last)];
        header.extend_from_slice(&len.to_le_bytes());
        header.extend_from_slice(&(!len).to_le_bytes());
        self.emit(&header);
        self.emit(data);
    }

    fn finish(mut self) -> (String, u64, String) {
        let rest = std::mem::take(&mut self.pending);
        self.block(&rest, true);
        let crc = (self.crc ^ 0xFFFF_FFFF).to_le_bytes();
        let isize = (self.raw_len as u32).to_le_bytes();
        self.emit(&crc);
        self.emit(&isize);
        self.file.sync_all().unwrap();
        (
            format!("sha256:{}", hex::encode(self.blob_hash.finalize())),
            self.blob_len,
            format!("sha256:{}", hex::encode(self.raw_hash.finalize())),
        )
    }
}

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};
