// A department developer's integration, in Node.js with grpc-js: load proto/ with
// @grpc/proto-loader (no hand-written message code), submit a batch, stream ratings and read
// each acknowledgement, read one back, subscribe to the feed, and see the errors.
//
// Run by the Rust integration suite (tests/it/clients.rs) against a real hub:
//     NODE_PATH=.tools/node_modules node tests/node/client_test.js --addr 127.0.0.1:50051 \
//         --proto proto --ca certs/dev/ca.pem --cert certs/dev/dev-admin.pem \
//         --key certs/dev/dev-admin.key
//
// The hub speaks mTLS: the client presents its certificate (whose CN is its registered
// principal) and checks the hub's against the CA. scripts/test-deps installs grpc-js and
// proto-loader into .tools/.
"use strict";

const assert = require("node:assert/strict");
const fs = require("node:fs");
const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

function args() {
  const out = {};
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i += 2) {
    if (!argv[i].startsWith("--") || argv[i + 1] === undefined) {
      throw new Error(`usage: --addr A --proto DIR --ca F --cert F --key F (at ${argv[i]})`);
    }
    out[argv[i].slice(2)] = argv[i + 1];
  }
  for (const k of ["addr", "proto", "ca", "cert", "key"]) {
    if (!out[k]) throw new Error(`--${k} is required`);
  }
  return out;
}

const CREDIT_CHARSET = "0123456789ABCDEFGHJKLMNPQRTUWXY";
const CREDIT_WEIGHTS = [1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28];

// Completes a 统一社会信用代码 with its GB 32100 check character.
function creditCode(first17) {
  let total = 0;
  for (let i = 0; i < 17; i++) total += CREDIT_CHARSET.indexOf(first17[i]) * CREDIT_WEIGHTS[i];
  return first17 + CREDIT_CHARSET[(31 - (total % 31)) % 31];
}

// Completes a 居民身份证号码 with its GB 11643 check digit.
function idNumber(first17) {
  const weights = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
  let total = 0;
  for (let i = 0; i < 17; i++) total += Number(first17[i]) * weights[i];
  return first17 + "10X98765432"[total % 11];
}

// Promisified unary call with a deadline.
function call(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + 30_000 }, (err, res) =>
      err ? reject(err) : resolve(res),
    );
  });
}

async function main() {
  const a = args();
  const protoDir = path.resolve(a.proto);
  const files = fs
    .readdirSync(path.join(protoDir, "ratinghub/v1"))
    .filter((f) => f.endsWith(".proto"))
    .map((f) => path.join("ratinghub/v1", f));
  const def = protoLoader.loadSync(files, {
    includeDirs: [protoDir],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
  });
  const v1 = grpc.loadPackageDefinition(def).ratinghub.v1;
  const creds = grpc.credentials.createSsl(
    fs.readFileSync(a.ca),
    fs.readFileSync(a.key),
    fs.readFileSync(a.cert),
  );
  // The development server certificate names localhost; the test dials 127.0.0.1.
  const options = { "grpc.ssl_target_name_override": "localhost" };
  const ingest = new v1.IngestService(a.addr, creds, options);
  const query = new v1.QueryService(a.addr, creds, options);
  const sync = new v1.SyncService(a.addr, creds, options);

  const ratedAt = { seconds: String(Math.floor(Date.now() / 1000)), nanos: 0 };
  const org = creditCode("11530100MC0000001");
  const rating = (key, extra = {}) => ({
    source_key: key,
    channel: "CHANNEL_MOBILE_APP",
    level: "LEVEL_VERY_SATISFIED",
    target_kind: "TARGET_KIND_ITEM",
    case_number: `NODE-CASE-${key}`,
    item_code: "530100-ITEM-7",
    item_name: "社会保障卡申领",
    region_code: "530103",
    org_credit_code: org,
    rated_at: ratedAt,
    rater: {
      kind: "RATER_KIND_NATURAL_PERSON",
      real_name: true,
      name: "赵六",
      id_number: idNumber("53010319850512002"),
      phone: "13600001234",
    },
    ...extra,
  });

  // A batch: one good rating, one broken; the good one is stored, the broken one named.
  const good = rating("node-0001", {
    level: "LEVEL_DISSATISFIED",
    detail_codes: ["501"],
    text: "材料要求不清楚",
  });
  const bad = { source_key: "node-0002", level: "LEVEL_SATISFIED" };
  const batch = await call(ingest, "SubmitRatings", { ratings: [good, bad] });
  const [first, second] = batch.results;
  assert.equal(first.outcome, "OUTCOME_ACCEPTED", JSON.stringify(first));
  assert.equal(second.outcome, "OUTCOME_INVALID", JSON.stringify(second));
  const fields = new Set(second.violations.map((v) => v.field));
  for (const f of ["channel", "target_kind", "region_code", "org_credit_code", "rated_at"]) {
    assert.ok(fields.has(f), `violation for ${f} in ${[...fields]}`);
  }

  // A stream: one acknowledgement per rating, in order, each after its commit.
  const n = 50;
  const acks = await new Promise((resolve, reject) => {
    const got = [];
    const stream = ingest.StreamRatings({ deadline: Date.now() + 60_000 });
    stream.on("data", (m) => got.push(m.result));
    stream.on("error", reject);
    stream.on("end", () => resolve(got));
    for (let i = 0; i < n; i++) stream.write({ rating: rating(`node-stream-${i}`) });
    stream.end();
  });
  assert.equal(acks.length, n, "one acknowledgement per streamed rating");
  acks.forEach((r, i) => {
    assert.equal(r.index, i, "acknowledgements in order");
    assert.equal(r.source_key, `node-stream-${i}`);
    assert.equal(r.outcome, "OUTCOME_ACCEPTED", JSON.stringify(r));
  });
  const seqs = acks.map((r) => BigInt(r.feed_sequence));
  for (let i = 1; i < n; i++) assert.ok(seqs[i] > seqs[i - 1], "feed sequences rise");

  // Read back, with personal data (this principal holds read-pii).
  const got = (await call(query, "GetRating", { hub_id: first.hub_id })).rating;
  assert.equal(got.hub_id, first.hub_id);
  assert.equal(got.level, "LEVEL_DISSATISFIED");
  assert.deepEqual(got.detail_codes, ["501"]);
  assert.equal(got.rater.phone, "13600001234");
  assert.equal(got.rater.id_number, idNumber("53010319850512002"));
  assert.equal(got.feed_sequence, first.feed_sequence);

  // The feed from the start: every stored rating once, in order.
  const total = 1 + n;
  const feed = await new Promise((resolve, reject) => {
    const seen = [];
    const sub = sync.Subscribe({ after_sequence: "0" });
    sub.on("data", (m) => {
      seen.push(m.rating);
      if (seen.length === total) {
        sub.cancel();
        resolve(seen);
      }
    });
    sub.on("error", (e) => {
      if (e.code !== grpc.status.CANCELLED) reject(e);
    });
  });
  assert.deepEqual(
    feed.map((r) => r.feed_sequence),
    Array.from({ length: total }, (_, i) => String(i + 1)),
  );
  assert.deepEqual(
    feed.map((r) => r.source_key),
    ["node-0001", ...acks.map((r) => r.source_key)],
  );

  // Request-level errors are gRPC statuses naming the field.
  await assert.rejects(call(ingest, "SubmitRatings", { ratings: [] }), (e) => {
    assert.equal(e.code, grpc.status.INVALID_ARGUMENT, e.message);
    assert.match(e.details, /ratings/);
    return true;
  });

  for (const c of [ingest, query, sync]) c.close();
  console.log("node client: ok");
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
