//! The generated contract (package `ratinghub.v1`) and its descriptor set for reflection.

pub mod v1 {
    #![allow(clippy::large_enum_variant, clippy::doc_lazy_continuation)]
    tonic::include_proto!("ratinghub.v1");
}

/// The encoded `FileDescriptorSet` of proto/, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/ratinghub_descriptor.bin"));

impl std::fmt::Debug for v1::Rater {
    // Name, ID number and phone are personal information: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rater")
            .field("kind", &self.kind)
            .field("real_name", &self.real_name)
            .field("name", &redacted(&self.name))
            .field("id_number", &redacted(&self.id_number))
            .field("credit_code", &self.credit_code)
            .field("phone", &redacted(&self.phone))
            .finish()
    }
}

fn redacted(s: &str) -> &'static str {
    if s.is_empty() { "" } else { "<redacted>" }
}
