//! bmaptool's block map (`.bmap`): which blocks of an image hold data.
//!
//! With a bmap, only the mapped ranges are the image; the rest is free
//! space, written as zeros (or skipped on a target that reads as zero,
//! like any zero run). Each mapped range's checksum is checked as it is
//! written, and verify-after-write reads back the mapped ranges only.
//!
//! Formats 1.4 and 2.x with SHA-256 range checksums (`bmaptool create`
//! since 3.2). SHA-1 bmaps (format ≤ 1.3) are refused: SHA-1 no longer
//! protects anything. The bmap file's own checksum (`BmapFileChecksum`,
//! computed with its value replaced by `0`s) is checked when present; its
//! authenticity comes from the plan's digest of the bmap file.
//!
//! Parsing only: this module never touches a disk.

use sha2::{Digest, Sha256};

/// Largest bmap file accepted (a 1 TiB image with 1 M ranges is ~100 MiB
/// of XML; real ones are kilobytes to a few megabytes).
pub const MAX_BMAP: usize = 64 * 1024 * 1024;

/// One mapped byte range `[start, end)` of the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedRange {
    pub start: u64,
    pub end: u64,
    /// The block numbers as written in the bmap, for messages.
    pub first_block: u64,
    pub last_block: u64,
    /// SHA-256 of the range's bytes, when the bmap has one.
    pub sha256: Option<[u8; 32]>,
}

/// A parsed, checked block map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bmap {
    pub image_size: u64,
    pub block_size: u64,
    /// Sorted, disjoint, inside the image.
    pub ranges: Vec<MappedRange>,
}

impl Bmap {
    /// Bytes the ranges cover.
    pub fn mapped_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }
}

fn text<'a>(root: roxmltree::Node<'a, 'a>, name: &str) -> Option<&'a str> {
    root.children()
        .find(|n| n.has_tag_name(name))
        .and_then(|n| n.text())
        .map(str::trim)
}

fn number(root: roxmltree::Node<'_, '_>, name: &str) -> Result<u64, String> {
    let t = text(root, name).ok_or_else(|| format!("<{name}> is missing"))?;
    t.parse()
        .map_err(|_| format!("<{name}> is not a number: {t:?}"))
}

fn sha256_hex(t: &str, what: &str) -> Result<[u8; 32], String> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(t.trim().to_ascii_lowercase(), &mut out)
        .map_err(|_| format!("{what}: expected 64 hex digits of SHA-256, got {t:?}"))?;
    Ok(out)
}

/// Parses and checks a bmap file.
pub fn parse(data: &[u8]) -> Result<Bmap, String> {
    if data.len() > MAX_BMAP {
        return Err(format!("larger than {MAX_BMAP} bytes"));
    }
    let xml = std::str::from_utf8(data).map_err(|e| format!("not UTF-8: {e}"))?;
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("not valid XML: {e}"))?;
    let root = doc.root_element();
    if !root.has_tag_name("bmap") {
        return Err(format!(
            "root element is <{}>, not <bmap>",
            root.tag_name().name()
        ));
    }
    let version = root.attribute("version").unwrap_or("");
    let (major, minor) = version
        .split_once('.')
        .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
        .ok_or_else(|| format!("version {version:?} is not MAJOR.MINOR"))?;
    if major == 0 || major > 2 {
        return Err(format!(
            "format version {version} is not supported (1.4 to 2.x)"
        ));
    }
    let alg = text(root, "ChecksumType").unwrap_or("sha1");
    if major == 1 && minor < 4 || alg != "sha256" {
        return Err(format!(
            "checksum type {alg} (format {version}): only SHA-256 bmaps are accepted; \
             re-create it with `bmaptool create` (3.2 or later)"
        ));
    }
    if let Some(sum) = text(root, "BmapFileChecksum") {
        let expected = sha256_hex(sum, "BmapFileChecksum")?;
        // The checksum is computed over the file with its own value zeroed.
        let zeroed = xml.replacen(sum, &"0".repeat(sum.len()), 1);
        let got: [u8; 32] = Sha256::digest(zeroed.as_bytes()).into();
        if got != expected {
            return Err(format!(
                "BmapFileChecksum does not match the file: expected {}, got {}",
                hex::encode(expected),
                hex::encode(got)
            ));
        }
    }
    let image_size = number(root, "ImageSize")?;
    let block_size = number(root, "BlockSize")?;
    if block_size == 0 || block_size % 512 != 0 || block_size > 1 << 24 {
        return Err(format!(
            "BlockSize {block_size} is not a multiple of 512 up to 16 MiB"
        ));
    }
    let blocks = image_size.div_ceil(block_size);
    if let Ok(count) = number(root, "BlocksCount") {
        if count != blocks {
            return Err(format!(
                "BlocksCount {count} disagrees with ImageSize {image_size} / BlockSize {block_size} = {blocks}"
            ));
        }
    }
    let map = root
        .children()
        .find(|n| n.has_tag_name("BlockMap"))
        .ok_or("<BlockMap> is missing")?;
    let mut ranges: Vec<MappedRange> = Vec::new();
    for (i, r) in map
        .children()
        .filter(|n| n.has_tag_name("Range"))
        .enumerate()
    {
        let t = r.text().unwrap_or("").trim();
        let bad = |why: &str| format!("<Range> {} ({t:?}): {why}", i + 1);
        let (a, b) = match t.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (t, t),
        };
        let first: u64 = a.parse().map_err(|_| bad("not FIRST-LAST block numbers"))?;
        let last: u64 = b.parse().map_err(|_| bad("not FIRST-LAST block numbers"))?;
        if last < first {
            return Err(bad("LAST is before FIRST"));
        }
        if last >= blocks {
            return Err(bad(&format!("beyond the image's {blocks} blocks")));
        }
        if let Some(prev) = ranges.last() {
            if first <= prev.last_block {
                return Err(bad("overlaps or precedes the range before it"));
            }
        }
        let sha256 = match r.attribute("chksum") {
            Some(c) => Some(sha256_hex(c, &bad("chksum"))?),
            None => None,
        };
        ranges.push(MappedRange {
            start: first * block_size,
            end: ((last + 1) * block_size).min(image_size),
            first_block: first,
            last_block: last,
            sha256,
        });
    }
    if let Ok(mapped) = number(root, "MappedBlocksCount") {
        let counted: u64 = ranges
            .iter()
            .map(|r| r.last_block - r.first_block + 1)
            .sum();
        if mapped != counted {
            return Err(format!(
                "MappedBlocksCount {mapped} disagrees with the ranges ({counted} blocks)"
            ));
        }
    }
    Ok(Bmap {
        image_size,
        block_size,
        ranges,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_checksum(body: &str) -> String {
        let placeholder = "0".repeat(64);
        let xml = body.replace("SUM", &placeholder);
        let sum = hex::encode(Sha256::digest(xml.as_bytes()));
        xml.replacen(&placeholder, &sum, 1)
    }

    const SAMPLE: &str = r#"<?xml version="1.0" ?>
<bmap version="2.0">
    <ImageSize> 20971520 </ImageSize>
    <BlockSize> 4096 </BlockSize>
    <BlocksCount> 5120 </BlocksCount>
    <MappedBlocksCount> 7    </MappedBlocksCount>
    <ChecksumType> sha256 </ChecksumType>
    <BmapFileChecksum> SUM </BmapFileChecksum>
    <BlockMap>
        <Range chksum="a0c061c21a1501e199b341c1022f620c9304d95d56c4fe9a227a99c4e743ec83"> 3-7 </Range>
        <Range> 1000-1001 </Range>
    </BlockMap>
</bmap>
"#;

    #[test]
    fn parses_bmaptool_output() {
        let b = parse(with_checksum(SAMPLE).as_bytes()).unwrap();
        assert_eq!(b.image_size, 20 << 20);
        assert_eq!(b.ranges.len(), 2);
        assert_eq!((b.ranges[0].start, b.ranges[0].end), (3 * 4096, 8 * 4096));
        assert!(b.ranges[0].sha256.is_some());
        assert!(b.ranges[1].sha256.is_none());
        assert_eq!(b.mapped_bytes(), 7 * 4096);
    }

    #[test]
    fn refuses_what_it_cannot_trust() {
        let ok = with_checksum(SAMPLE);
        // Edited after the checksum was computed.
        let edited = ok.replace("1000-1001", "1000-1002");
        assert!(parse(edited.as_bytes())
            .unwrap_err()
            .contains("BmapFileChecksum"));
        let sha1 = with_checksum(&SAMPLE.replace("sha256", "sha1"));
        assert!(parse(sha1.as_bytes()).unwrap_err().contains("only SHA-256"));
        let overlap = with_checksum(
            &SAMPLE
                .replace("1000-1001", "5-9")
                .replace("<MappedBlocksCount> 7", "<MappedBlocksCount> 10"),
        );
        assert!(parse(overlap.as_bytes()).unwrap_err().contains("overlaps"));
        let beyond = with_checksum(&SAMPLE.replace("1000-1001", "5119-5120"));
        assert!(parse(beyond.as_bytes()).unwrap_err().contains("beyond"));
        let count =
            with_checksum(&SAMPLE.replace("<MappedBlocksCount> 7", "<MappedBlocksCount> 8"));
        assert!(parse(count.as_bytes())
            .unwrap_err()
            .contains("MappedBlocksCount"));
        assert!(parse(b"<nope/>").unwrap_err().contains("<bmap>"));
        assert!(parse(b"not xml").is_err());
    }
}
