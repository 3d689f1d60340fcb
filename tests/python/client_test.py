"""A department developer's integration, in Python: generate stubs from proto/ with
grpcio-tools, submit ratings, read one back, and see a validation error.

Run by the Rust integration suite (tests/it/clients.rs) against a real hub:
    python tests/python/client_test.py --addr 127.0.0.1:50051 --proto proto --out /tmp/gen \
        --ca certs/dev/ca.pem --cert certs/dev/dev-admin.pem --key certs/dev/dev-admin.key

The hub speaks mTLS: the client presents its certificate (whose CN is its registered
principal) and checks the hub's against the CA.
"""

import argparse
import pathlib
import subprocess
import sys
import time


def generate(proto_dir: pathlib.Path, out_dir: pathlib.Path) -> None:
    protos = sorted(str(p) for p in proto_dir.glob("ratinghub/v1/*.proto"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}",
         f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", *protos],
        check=True,
    )


CREDIT_CHARSET = "0123456789ABCDEFGHJKLMNPQRTUWXY"
CREDIT_WEIGHTS = [1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28]


def credit_code(first17: str) -> str:
    """Completes a 统一社会信用代码 with its GB 32100 check character."""
    total = sum(CREDIT_CHARSET.index(c) * w for c, w in zip(first17, CREDIT_WEIGHTS))
    return first17 + CREDIT_CHARSET[(31 - total % 31) % 31]


def id_number(first17: str) -> str:
    """Completes a 居民身份证号码 with its GB 11643 check digit."""
    weights = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]
    total = sum(int(c) * w for c, w in zip(first17, weights))
    return first17 + "10X98765432"[total % 11]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", required=True)
    ap.add_argument("--proto", required=True, type=pathlib.Path)
    ap.add_argument("--out", required=True, type=pathlib.Path)
    ap.add_argument("--ca", required=True, type=pathlib.Path)
    ap.add_argument("--cert", required=True, type=pathlib.Path)
    ap.add_argument("--key", required=True, type=pathlib.Path)
    args = ap.parse_args()

    generate(args.proto, args.out)
    sys.path.insert(0, str(args.out))

    import grpc
    from google.protobuf.timestamp_pb2 import Timestamp
    from ratinghub.v1 import ingest_pb2, ingest_pb2_grpc, query_pb2, query_pb2_grpc, rating_pb2

    credentials = grpc.ssl_channel_credentials(
        root_certificates=args.ca.read_bytes(),
        private_key=args.key.read_bytes(),
        certificate_chain=args.cert.read_bytes(),
    )
    # The development server certificate names localhost; the test dials 127.0.0.1.
    channel = grpc.secure_channel(
        args.addr, credentials, options=[("grpc.ssl_target_name_override", "localhost")]
    )
    grpc.channel_ready_future(channel).result(timeout=30)
    ingest = ingest_pb2_grpc.IngestServiceStub(channel)
    query = query_pb2_grpc.QueryServiceStub(channel)

    rated_at = Timestamp(seconds=int(time.time()))
    good = rating_pb2.Rating(
        source_key="py-0001",
        channel=rating_pb2.CHANNEL_MOBILE_APP,
        level=rating_pb2.LEVEL_DISSATISFIED,
        target_kind=rating_pb2.TARGET_KIND_ITEM,
        case_number="PY-CASE-1",
        item_code="530100-ITEM-9",
        item_name="不动产登记",
        region_code="530102",
        org_credit_code=credit_code("11530100MB0000001"),
        detail_codes=["501", "502"],
        text="等待时间过长",
        rated_at=rated_at,
        rater=rating_pb2.Rater(
            kind=rating_pb2.RATER_KIND_NATURAL_PERSON,
            real_name=True,
            name="李四",
            id_number=id_number("53010219900307001"),
            phone="13912345678",
        ),
        attributes={"dataSource": "101"},
    )
    bad = rating_pb2.Rating(source_key="py-0002", level=rating_pb2.LEVEL_SATISFIED)

    resp = ingest.SubmitRatings(ingest_pb2.SubmitRatingsRequest(ratings=[good, bad]), timeout=30)
    first, second = resp.results
    assert first.outcome == rating_pb2.OUTCOME_ACCEPTED, first
    assert second.outcome == rating_pb2.OUTCOME_INVALID, second
    fields = {v.field for v in second.violations}
    assert {"channel", "target_kind", "region_code", "org_credit_code", "rated_at"} <= fields, fields

    again = ingest.SubmitRatings(ingest_pb2.SubmitRatingsRequest(ratings=[good]), timeout=30)
    assert again.results[0].outcome == rating_pb2.OUTCOME_DUPLICATE, again
    assert again.results[0].hub_id == first.hub_id

    got = query.GetRating(query_pb2.GetRatingRequest(hub_id=first.hub_id), timeout=30).rating
    assert got.hub_id == first.hub_id
    assert got.source_key == "py-0001"
    assert got.level == rating_pb2.LEVEL_DISSATISFIED
    assert list(got.detail_codes) == ["501", "502"]
    assert got.attributes["dataSource"] == "101"
    assert got.feed_sequence == first.feed_sequence
    # Personal data comes back (this principal holds read-pii), and was never stored in clear.
    assert got.rater.id_number == id_number("53010219900307001")
    assert got.rater.phone == "13912345678"

    listed = query.ListRatings(
        query_pb2.ListRatingsRequest(filter=query_pb2.RatingFilter(region_code_prefix="5301")),
        timeout=30,
    )
    assert [r.hub_id for r in listed.ratings] == [first.hub_id]

    try:
        ingest.SubmitRatings(ingest_pb2.SubmitRatingsRequest(ratings=[]), timeout=30)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
        assert "ratings" in e.details(), e.details()
    else:
        raise AssertionError("an empty batch must be refused")

    print("python client: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
