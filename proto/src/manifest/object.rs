//! Framing of manifest objects: `HGM`, kind, version, protobuf body. The magic is fixed
//! forever; a reader that meets a version it does not know refuses the object rather than
//! guessing.

use crate::DecodeError;

pub const MAGIC: &[u8; 3] = b"HGM";
pub const FORMAT_VERSION: u8 = 1;
pub(crate) const HEADER_LEN: usize = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectKind {
    Tree,
    /// The part list of a directory split over several tree objects.
    TreeIndex,
    ChunkList,
}

impl ObjectKind {
    fn byte(self) -> u8 {
        match self {
            ObjectKind::Tree => b'T',
            ObjectKind::TreeIndex => b'I',
            ObjectKind::ChunkList => b'L',
        }
    }

    /// The kind named by an object's header, checking magic and version.
    pub fn of(bytes: &[u8]) -> Result<ObjectKind, DecodeError> {
        if bytes.len() < HEADER_LEN || &bytes[..3] != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let kind = match bytes[3] {
            b'T' => ObjectKind::Tree,
            b'I' => ObjectKind::TreeIndex,
            b'L' => ObjectKind::ChunkList,
            other => {
                return Err(DecodeError::invalid(
                    "manifest object",
                    format!("unknown kind byte {other:#04x}"),
                ))
            }
        };
        if bytes[4] != FORMAT_VERSION {
            return Err(DecodeError::UnsupportedVersion(bytes[4]));
        }
        Ok(kind)
    }

    pub(crate) fn header(self) -> [u8; HEADER_LEN] {
        [MAGIC[0], MAGIC[1], MAGIC[2], self.byte(), FORMAT_VERSION]
    }

    /// Checks the header of a complete or partial object and returns the body.
    pub(crate) fn strip(self, bytes: &[u8]) -> Result<&[u8], DecodeError> {
        if bytes.len() < HEADER_LEN || &bytes[..3] != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        if bytes[3] != self.byte() {
            return Err(DecodeError::WrongKind {
                expected: self.byte() as char,
                found: bytes[3] as char,
            });
        }
        if bytes[4] != FORMAT_VERSION {
            return Err(DecodeError::UnsupportedVersion(bytes[4]));
        }
        Ok(&bytes[HEADER_LEN..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_checks() {
        let mut obj = ObjectKind::Tree.header().to_vec();
        obj.extend_from_slice(b"body");
        assert_eq!(ObjectKind::Tree.strip(&obj).unwrap(), b"body");
        assert!(matches!(
            ObjectKind::ChunkList.strip(&obj),
            Err(DecodeError::WrongKind { .. })
        ));
        obj[4] = 9;
        assert!(matches!(
            ObjectKind::Tree.strip(&obj),
            Err(DecodeError::UnsupportedVersion(9))
        ));
        assert!(matches!(
            ObjectKind::Tree.strip(b"XYZT\x01"),
            Err(DecodeError::BadMagic)
        ));
    }
}
