//! The gRPC codec of every generated service and client: prost's, with a guard in front of
//! the decoding of ingest requests.
//!
//! prost decodes a whole message before anyone can look at it, and a message of a few MiB of
//! empty repeated entries (1.4 M empty `indicator_answers` fit in 4 MiB) decodes to over
//! 100 MB, or a few GB for a batch of empty ratings. The guard walks the protobuf wire format
//! of `SubmitRatingsRequest`, `StreamRatingsRequest` and `ReportServiceCasesRequest` first,
//! counting the entries of every repeated field, and refuses the message (INVALID_ARGUMENT,
//! the field named) as soon as a count is past the limit the hub would refuse after decoding
//! anyway — without allocating anything. Every other message decodes as before.

use std::any::TypeId;
use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder};

use crate::domain::rating::limits;
use crate::pb::v1 as pb;

/// Most items one request may carry, whatever the configuration (`server.max_batch` is
/// checked against it at start).
pub const BATCH_CEILING: usize = 10_000;

/// How far past its limit a repeated field may go before the whole message is refused.
const GUARD_FACTOR: usize = 8;

/// Most repeated entries (of every item together) one message may carry.
const ENTRY_BUDGET: usize = 400_000;

/// Most quality flags a rating can carry (each flag once).
const QUALITY_FLAGS: usize = 16;

/// prost's codec, with the guard in front of its decoder.
#[derive(Debug, Clone)]
pub struct GuardedCodec<T, U> {
    inner: ProstCodec<T, U>,
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for GuardedCodec<T, U> {
    fn default() -> Self {
        Self {
            inner: ProstCodec::default(),
            _pd: PhantomData,
        }
    }
}

impl<T, U> Codec for GuardedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = GuardedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.inner.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        GuardedDecoder {
            inner: ProstCodec::<T, U>::raw_decoder(BufferSettings::default()),
        }
    }
}

/// prost's decoder, after the guard.
#[derive(Debug)]
pub struct GuardedDecoder<U> {
    inner: ProstDecoder<U>,
}

impl<U: Message + Default + Send + 'static> Decoder for GuardedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        use prost::bytes::Buf;
        guard::<U>(buf.chunk())?;
        self.inner.decode(buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}

/// Refuses a message of type `U` whose repeated fields hold more entries than allowed.
pub fn guard<U: 'static>(bytes: &[u8]) -> Result<(), Status> {
    let t = TypeId::of::<U>();
    let found = if t == TypeId::of::<pb::SubmitRatingsRequest>() {
        batch(bytes, "ratings", BATCH_CEILING, rating)
    } else if t == TypeId::of::<pb::StreamRatingsRequest>() {
        batch(bytes, "rating", usize::MAX, rating)
    } else if t == TypeId::of::<pb::ReportServiceCasesRequest>() {
        batch(bytes, "cases", BATCH_CEILING, service_case)
    } else {
        Ok(())
    };
    found.map_err(|Refusal { field, description }| {
        crate::api::bad_request(&[crate::api::violation(field, description)])
    })
}

/// Why a message is refused.
#[derive(Debug, PartialEq)]
struct Refusal {
    field: String,
    description: String,
}

fn malformed(at: &str) -> Refusal {
    refusal(
        at.to_owned(),
        "is not well-formed protobuf (truncated, or holding a group)",
    )
}

fn refusal(field: String, description: impl Into<String>) -> Refusal {
    Refusal {
        field,
        description: description.into(),
    }
}

/// A field of a message on the wire.
enum Field<'a> {
    Varint,
    Fixed,
    Len(&'a [u8]),
}

/// Walks the fields of one message (not into sub-messages); `None` for wire data that is
/// not well formed, or that holds a group (wire types 3 and 4: proto3 has none, and prost
/// skips an unknown group without the guard seeing inside it).
fn fields(mut bytes: &[u8]) -> impl Iterator<Item = Option<(u32, Field<'_>)>> {
    let mut broken = false;
    std::iter::from_fn(move || {
        if broken || bytes.is_empty() {
            return None;
        }
        let Some(key) = varint(&mut bytes) else {
            broken = true;
            return Some(None);
        };
        let number = (key >> 3) as u32;
        let field = match key & 7 {
            0 => varint(&mut bytes).map(|_| Field::Varint),
            1 => skip(&mut bytes, 8).map(|_| Field::Fixed),
            5 => skip(&mut bytes, 4).map(|_| Field::Fixed),
            2 => varint(&mut bytes)
                .and_then(|n| usize::try_from(n).ok())
                .and_then(|n| skip(&mut bytes, n))
                .map(Field::Len),
            _ => None,
        };
        match field {
            Some(f) => Some(Some((number, f))),
            None => {
                broken = true;
                Some(None)
            }
        }
    })
}

fn varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for i in 0..10 {
        let (&b, rest) = bytes.split_first()?;
        *bytes = rest;
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn skip<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if bytes.len() < n {
        return None;
    }
    let (head, rest) = bytes.split_at(n);
    *bytes = rest;
    Some(head)
}

/// An item check: the item's bytes, its name in errors, the entries counted so far in the
/// whole message.
type ItemCheck = fn(&[u8], &str, &mut usize) -> Result<(), Refusal>;

/// A request whose field 1 repeats `item`: at most `max` of them, each checked.
fn batch(bytes: &[u8], name: &str, max: usize, item: ItemCheck) -> Result<(), Refusal> {
    let mut n = 0usize;
    let mut entries = 0usize;
    for f in fields(bytes) {
        let Some((number, field)) = f else {
            return Err(malformed(name));
        };
        let (1, Field::Len(inner)) = (number, field) else {
            continue;
        };
        if max == usize::MAX && n == 1 {
            // A singular message field given twice is merged by prost, repeated fields
            // joined: counted apart, each copy could bring its own full allowance.
            return Err(refusal(name.to_owned(), "is given more than once"));
        }
        if n == max {
            return Err(refusal(
                name.to_owned(),
                format!("at most {max} per request"),
            ));
        }
        let at = if max == usize::MAX {
            name.to_owned()
        } else {
            format!("{name}[{n}]")
        };
        item(inner, &at, &mut entries)?;
        n += 1;
    }
    Ok(())
}

/// Counts the entries of each of `limited` (field number, name, limit) in one message.
fn counted(
    bytes: &[u8],
    at: &str,
    entries: &mut usize,
    limited: &[(u32, &str, usize)],
) -> Result<(), Refusal> {
    let mut counts = [0usize; 4];
    for f in fields(bytes) {
        let Some((number, field)) = f else {
            return Err(malformed(at));
        };
        let Some(i) = limited.iter().position(|(n, _, _)| *n == number) else {
            continue;
        };
        let (_, name, limit) = limited[i];
        let n = match field {
            // A packed repeated enum: one entry per varint.
            Field::Len(packed) if name == "quality_flags" => {
                packed.iter().filter(|b| **b & 0x80 == 0).count()
            }
            _ => 1,
        };
        counts[i] += n;
        *entries += n;
        if counts[i] > limit * GUARD_FACTOR {
            return Err(refusal(
                format!("{at}.{name}"),
                format!("has more than {limit} entries"),
            ));
        }
        if *entries > ENTRY_BUDGET {
            return Err(refusal(
                at.to_owned(),
                format!("the request holds more than {ENTRY_BUDGET} repeated entries"),
            ));
        }
    }
    Ok(())
}

fn rating(bytes: &[u8], at: &str, entries: &mut usize) -> Result<(), Refusal> {
    counted(
        bytes,
        at,
        entries,
        &[
            (17, "detail_codes", limits::DETAIL_CODES),
            (18, "indicator_answers", limits::INDICATORS),
            (28, "attributes", limits::ATTRIBUTES),
            (29, "quality_flags", QUALITY_FLAGS),
        ],
    )
}

fn service_case(bytes: &[u8], at: &str, entries: &mut usize) -> Result<(), Refusal> {
    counted(
        bytes,
        at,
        entries,
        &[(16, "attributes", limits::ATTRIBUTES)],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded_rating(detail_codes: usize, indicators: usize) -> pb::Rating {
        pb::Rating {
            source_key: "k".into(),
            detail_codes: vec![String::new(); detail_codes],
            indicator_answers: vec![pb::IndicatorAnswer::default(); indicators],
            ..Default::default()
        }
    }

    fn check<U: Message + 'static>(m: &U) -> Result<(), Refusal> {
        let bytes = m.encode_to_vec();
        let t = TypeId::of::<U>();
        if t == TypeId::of::<pb::SubmitRatingsRequest>() {
            batch(&bytes, "ratings", BATCH_CEILING, rating)
        } else {
            batch(&bytes, "rating", usize::MAX, rating)
        }
    }

    #[test]
    fn repeated_fields_within_their_limits_pass() {
        let r = encoded_rating(limits::DETAIL_CODES, limits::INDICATORS);
        let mut r = r;
        r.attributes = (0..limits::ATTRIBUTES)
            .map(|i| (i.to_string(), String::new()))
            .collect();
        r.quality_flags = vec![1, 2, 3];
        let req = pb::SubmitRatingsRequest {
            ratings: vec![r.clone(); 1000],
        };
        assert_eq!(check(&req), Ok(()));
        assert_eq!(check(&pb::StreamRatingsRequest { rating: Some(r) }), Ok(()));
    }

    #[test]
    fn a_million_empty_entries_are_refused_naming_the_field_without_decoding() {
        let req = pb::SubmitRatingsRequest {
            ratings: vec![encoded_rating(0, 0), encoded_rating(0, 1_400_000)],
        };
        assert_eq!(
            check(&req),
            Err(refusal(
                "ratings[1].indicator_answers".into(),
                "has more than 32 entries"
            ))
        );
        let stream = pb::StreamRatingsRequest {
            rating: Some(encoded_rating(32 * GUARD_FACTOR + 1, 0)),
        };
        assert_eq!(check(&stream).unwrap_err().field, "rating.detail_codes");
    }

    #[test]
    fn a_batch_over_the_ceiling_is_refused_before_its_ratings_are_decoded() {
        let req = pb::SubmitRatingsRequest {
            ratings: vec![pb::Rating::default(); BATCH_CEILING + 1],
        };
        assert_eq!(check(&req).unwrap_err().field, "ratings");
    }

    #[test]
    fn a_field_a_little_over_its_limit_is_left_to_the_item_validation() {
        // 33 detail codes: OUTCOME_INVALID for that item alone, after decoding.
        let req = pb::SubmitRatingsRequest {
            ratings: vec![encoded_rating(33, 33)],
        };
        assert_eq!(check(&req), Ok(()));
    }

    #[test]
    fn many_items_each_within_the_guard_exceed_the_budget_of_the_message() {
        let req = pb::SubmitRatingsRequest {
            ratings: vec![encoded_rating(200, 200); 1001],
        };
        assert!(
            check(&req)
                .unwrap_err()
                .description
                .contains("repeated entries")
        );
    }

    #[test]
    fn packed_quality_flags_count_each_entry() {
        let mut r = encoded_rating(0, 0);
        r.quality_flags = vec![1; QUALITY_FLAGS * GUARD_FACTOR + 1];
        assert_eq!(
            check(&pb::StreamRatingsRequest { rating: Some(r) })
                .unwrap_err()
                .field,
            "rating.quality_flags"
        );
    }

    #[test]
    fn broken_wire_data_and_groups_are_refused() {
        // A length past the end.
        assert_eq!(
            batch(&[0x0a, 0xff, 0x01], "ratings", 10, rating),
            Err(malformed("ratings"))
        );
        assert_eq!(
            rating(&[0x8a, 0x01, 0x05, 0x00], "r", &mut 0),
            Err(malformed("r"))
        );
        // An empty group (field 20) before two million empty ratings: prost would skip the
        // group and decode the ratings; the guard refuses the message at the group.
        let mut bytes = vec![0xa3, 0x01, 0xa4, 0x01];
        bytes.extend([0x0a, 0x00].repeat(1000));
        assert_eq!(
            batch(&bytes, "ratings", BATCH_CEILING, rating),
            Err(malformed("ratings"))
        );
        // The same inside a rating.
        assert_eq!(
            rating(&[0xa3, 0x01, 0xa4, 0x01], "r", &mut 0),
            Err(malformed("r"))
        );
    }

    #[test]
    fn a_stream_message_may_carry_its_rating_once() {
        let one = pb::StreamRatingsRequest {
            rating: Some(encoded_rating(32, 32)),
        }
        .encode_to_vec();
        let twice = [one.clone(), one].concat();
        assert_eq!(
            batch(&twice, "rating", usize::MAX, rating),
            Err(refusal("rating".into(), "is given more than once"))
        );
    }
}
