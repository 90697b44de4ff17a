//! Width and height of a PNG or JPEG read from its header, without decoding the picture, so an
//! input upstream would refuse is refused here before it costs queue time.

/// Why an image's size could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("Base64 image must be a JPEG or PNG")]
    NotAnImage,
    #[error("the image header is truncated or damaged")]
    Damaged,
}

/// (width, height) in pixels.
pub fn dimensions(bytes: &[u8]) -> Result<(u32, u32), HeaderError> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        png(bytes)
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        jpeg(bytes)
    } else {
        Err(HeaderError::NotAnImage)
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// The first chunk of a PNG is IHDR: width and height, 4 bytes each, big-endian.
fn png(b: &[u8]) -> Result<(u32, u32), HeaderError> {
    let ihdr = b.get(8..24).ok_or(HeaderError::Damaged)?;
    if &ihdr[4..8] != b"IHDR" {
        return Err(HeaderError::Damaged);
    }
    Ok((be32(&ihdr[8..12]), be32(&ihdr[12..16])))
}

/// Walks the JPEG's segments up to the first start-of-frame marker, which holds the size.
fn jpeg(b: &[u8]) -> Result<(u32, u32), HeaderError> {
    let mut i = 2;
    loop {
        // Markers may be padded with any number of 0xFF bytes.
        while b.get(i) == Some(&0xFF) && b.get(i + 1) == Some(&0xFF) {
            i += 1;
        }
        let marker = match (b.get(i), b.get(i + 1)) {
            (Some(0xFF), Some(m)) => *m,
            _ => return Err(HeaderError::Damaged),
        };
        i += 2;
        match marker {
            // Standalone markers carry no length.
            0x01 | 0xD0..=0xD7 => continue,
            // End of image or start of scan before any frame header.
            0xD9 | 0xDA => return Err(HeaderError::Damaged),
            _ => {}
        }
        let len = usize::from(be16(b.get(i..i + 2).ok_or(HeaderError::Damaged)?));
        if len < 2 {
            return Err(HeaderError::Damaged);
        }
        // SOF0..SOF15, except DHT (C4), JPG (C8) and DAC (CC).
        if matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC) {
            let sof = b.get(i + 2..i + 7).ok_or(HeaderError::Damaged)?;
            let height = u32::from(be16(&sof[1..3]));
            let width = u32::from(be16(&sof[3..5]));
            return Ok((width, height));
        }
        i += len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_header(w: u32, h: u32) -> Vec<u8> {
        let mut b = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        b.extend_from_slice(&w.to_be_bytes());
        b.extend_from_slice(&h.to_be_bytes());
        b.extend_from_slice(&[8, 2, 0, 0, 0]);
        b
    }

    fn jpeg_header(w: u16, h: u16) -> Vec<u8> {
        let mut b = vec![0xFF, 0xD8];
        // An APP0 segment first, as JFIF files have, then a padded SOF2 (progressive).
        b.extend_from_slice(&[0xFF, 0xE0, 0x00, 0x06, b'J', b'F', b'I', b'F']);
        b.extend_from_slice(&[0xFF, 0xFF, 0xC2, 0x00, 0x11, 0x08]);
        b.extend_from_slice(&h.to_be_bytes());
        b.extend_from_slice(&w.to_be_bytes());
        b.extend_from_slice(&[0x03; 10]);
        b
    }

    #[test]
    fn reads_png_and_jpeg_sizes() {
        assert_eq!(dimensions(&png_header(640, 480)), Ok((640, 480)));
        assert_eq!(dimensions(&jpeg_header(300, 750)), Ok((300, 750)));
    }

    #[test]
    fn refuses_what_is_not_an_image_or_is_cut_short() {
        assert_eq!(dimensions(b"hello"), Err(HeaderError::NotAnImage));
        assert_eq!(
            dimensions(&png_header(1, 1)[..20]),
            Err(HeaderError::Damaged)
        );
        assert_eq!(
            dimensions(&jpeg_header(1, 1)[..12]),
            Err(HeaderError::Damaged)
        );
        assert_eq!(
            dimensions(&[0xFF, 0xD8, 0xFF, 0xD9]),
            Err(HeaderError::Damaged)
        );
    }

    #[test]
    fn never_panics_on_any_prefix() {
        for full in [png_header(400, 400), jpeg_header(400, 400)] {
            for cut in 0..full.len() {
                let _ = dimensions(&full[..cut]);
            }
        }
    }
}
