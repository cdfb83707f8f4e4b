#!/usr/bin/env node
// Interop scenario: three real RFC 9420 clients (ts-mls) against a Sovereign server.
//
//   node scenario.mjs --url=ws://127.0.0.1:PORT/ws \
//     --alice-token=T --alice-user-id=U --alice-username=alice \
//     --bob-token=...  --carol-token=...   [--outsider-user-id=U] [--timeout=50]
//
// (use --opt=value: a base64url session token may begin with "-")
//
// Prints exactly one JSON line on stdout ({"ok": true, ...} or {"ok": false, "error": ...})
// and exits 0 only if every step passed. Progress goes to stderr.
import { parseArgs } from "node:util";
import { createApplicationMessage, createGroupInfoWithExternalPubAndRatchetTree, encodeMlsMessage } from "ts-mls";
import { encodeKeyPackage } from "ts-mls/keyPackage.js";
import { p256, p384, p521 } from "@noble/curves/nist.js";
import { Member, suiteImpl } from "./lib/member.mjs";

const NAMES = ["alice", "bob", "carol"];
const options = {
  url: { type: "string" },
  timeout: { type: "string", default: "50" },
  "outsider-user-id": { type: "string" }, // a registered user outside the conversation
};
for (const n of NAMES) {
  options[`${n}-token`] = { type: "string" };
  options[`${n}-user-id`] = { type: "string" };
  options[`${n}-username`] = { type: "string" };
}
const result = { ok: false, steps: [] };
let args;
try {
  args = parseArgs({ options, strict: true }).values;
} catch (err) {
  result.error = String(err);
  process.stdout.write(JSON.stringify(result) + "\n");
  process.exit(1);
}

const t0 = Date.now();
const log = (msg) => process.stderr.write(`[${((Date.now() - t0) / 1000).toFixed(2)}s] ${msg}\n`);
const step = (name, data = {}) => {
  result.steps.push(name);
  log(name);
  return data;
};
function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
}
function finish(code) {
  process.stdout.write(JSON.stringify(result, (_k, v) => (typeof v === "bigint" ? Number(v) : v)) + "\n");
  process.exit(code);
}

const watchdog = setTimeout(() => {
  result.error = `scenario timed out after ${args.timeout} s (last step: ${result.steps.at(-1) ?? "none"})`;
  finish(2);
}, Number(args.timeout) * 1000);

async function everyoneReceives(members, texts) {
  // texts: {userId: [text]}; every member must decrypt everyone else's texts
  await Promise.all(
    members.map((m) => {
      const others = Object.fromEntries(Object.entries(texts).filter(([uid]) => uid !== m.userId));
      return m.waitForTexts(others);
    }),
  );
}

async function exchange(members, label) {
  const texts = {};
  for (const m of members) {
    const text = `${label}: hello from ${m.name} at epoch ${m.epoch}`;
    await m.sendText(text);
    texts[m.userId] = [text];
  }
  await everyoneReceives(members, texts);
  return { label, epoch: members[0].epoch, senders: members.map((m) => m.name), decrypted_by_all: true };
}

async function allAtEpoch(members, epoch) {
  await Promise.all(members.map((m) => m.until(() => m.epoch === epoch, 10_000, `epoch ${epoch}`)));
}

async function main() {
  if (!args.url) throw new Error("--url is required");
  for (const n of NAMES) if (!args[`${n}-token`]) throw new Error(`--${n}-token is required`);

  const [alice, bob, carol] = await Promise.all(
    NAMES.map((n) =>
      Member.connect(args.url, {
        name: n,
        token: args[`${n}-token`],
        userId: args[`${n}-user-id`],
        username: args[`${n}-username`],
      }),
    ),
  );
  const all = [alice, bob, carol];
  step("connected");

  // 1. Real KeyPackages under strict validation: a batch, then a last-resort one.
  const kp = {};
  for (const m of all) {
    const batch = await m.uploadKeyPackages(5);
    check(batch === 5, `${m.name}: Ack.count ${batch} for 5 KeyPackages`);
    const lr = await m.uploadKeyPackages(1, { lastResort: true });
    check(lr === 1, `${m.name}: Ack.count ${lr} for the last-resort KeyPackage`);
    kp[m.name] = { batch, last_resort: lr };
  }
  // ECDSA suites the server verifies (P-256, P-521, P-384), identity = username.
  // ts-mls 1.6.4 emits *compressed* SEC1 signature keys for these suites (noble's
  // getPublicKey default), which RFC 9420 §5.1.1 does not allow (ECDSA keys are an
  // UncompressedPointRepresentation): strict validation must refuse those, and accept
  // the same KeyPackage built by ts-mls with the key in the RFC encoding.
  const extra = {};
  for (const [suite, curve] of [
    ["MLS_128_DHKEMP256_AES128GCM_SHA256_P256", p256],
    ["MLS_256_DHKEMP521_AES256GCM_SHA512_P521", p521],
    ["MLS_256_DHKEMP384_AES256GCM_SHA384_P384", p384],
  ]) {
    const impl = await suiteImpl(suite);
    const asMls = (k) => encodeMlsMessage({ version: "mls10", wireformat: "mls_key_package", keyPackage: k.publicPackage });
    const compressed = await alice.newKeyPackage({ impl, identity: alice.username });
    const refused = await alice.uploadRaw([asMls(compressed)]);
    check(!refused.ok && refused.code === 5001 && /signature_key/.test(refused.message), `${suite} compressed key refused: ${JSON.stringify(refused)}`);
    const signKey = curve.utils.randomSecretKey();
    const signatureKeys = { signKey, publicKey: curve.getPublicKey(signKey, false) };
    const conformant = await alice.newKeyPackage({ impl, identity: alice.username, signatureKeys });
    const accepted = await alice.uploadRaw([asMls(conformant)]);
    check(accepted.ok && accepted.count === 1, `${suite} KeyPackage accepted: ${JSON.stringify(accepted)}`);
    extra[suite] = { ts_mls_default_compressed_key: refused, uncompressed_key: accepted };
  }
  kp.extra_suites = extra;
  result.key_packages = step("key packages uploaded", kp);

  // 2. Negative: KeyPackages the Authentication Service must refuse (5001).
  const negative = {};
  {
    const foreign = await alice.newKeyPackage({ identity: bob.userId });
    negative.identity_other_user_id = await alice.uploadRaw([encodeKeyPackage(foreign.publicPackage)]);
    const foreignName = await alice.newKeyPackage({ identity: bob.username });
    negative.identity_other_username = await alice.uploadRaw([
      encodeMlsMessage({ version: "mls10", wireformat: "mls_key_package", keyPackage: foreignName.publicPackage }),
    ]);
    const good = await alice.newKeyPackage();
    const tampered = encodeKeyPackage({ ...good.publicPackage, signature: flip(good.publicPackage.signature) });
    negative.bad_signature = await alice.uploadRaw([tampered]);
    // all-or-nothing: a valid package followed by a foreign one refuses the batch, naming index 1
    const ok1 = await alice.newKeyPackage();
    negative.mixed_batch = await alice.uploadRaw([encodeKeyPackage(ok1.publicPackage), encodeKeyPackage(foreign.publicPackage)]);
  }
  for (const [k, v] of Object.entries(negative)) check(!v.ok && v.code === 5001, `${k} refused with 5001: ${JSON.stringify(v)}`);
  check(/package 1/.test(negative.mixed_batch.message), `mixed batch names index 1: ${negative.mixed_batch.message}`);
  result.negative = step("foreign / forged KeyPackages refused", negative);

  // 3. Server conversation + MLS group.
  const created = await alice.createConversation("ts-mls interop", [bob.userId, carol.userId]);
  await alice.createMlsGroup();
  result.conversation_id = created.conversation_id;
  result.group_id = alice.groupIdHex;
  step("conversation and MLS group created");

  // 4. alice adds bob: commit bundle (commit + Welcome + GroupInfo).
  const addBob = await alice.addMembers([bob.userId]);
  check(addBob.epoch === 0, `first commit at epoch 0, got ${addBob.epoch}`);
  await bob.until(() => bob.state !== undefined, 10_000, "Welcome");
  check(bob.epoch === 1 && bob.welcomedBy === alice.userId, `bob joined at epoch ${bob.epoch}`);
  step("bob joined from MLS_WELCOME_RECEIVE");

  // 5. alice adds carol; bob applies that commit from MLS_COMMIT_BROADCAST.
  const addCarol = await alice.addMembers([carol.userId]);
  check(addCarol.epoch === 1, `second commit at epoch 1, got ${addCarol.epoch}`);
  await carol.until(() => carol.state !== undefined, 10_000, "Welcome");
  await allAtEpoch(all, 2);
  check(bob.commitsApplied.some((c) => c.epoch === 1 && c.sender_id === alice.userId && !c.own), "bob applied the add-carol commit");
  result.adds = step("carol joined; bob processed the commit", { bob: addBob, carol: addCarol });

  // 6. Everyone exchanges application messages.
  result.messages = [await exchange(all, "round1")];
  step("round 1 messages decrypted by every member");

  // 7. Race: bob and carol commit for the same epoch at the same time.
  const raceEpoch = bob.epoch;
  const [pb, pc] = [await bob.prepareCommit(), await carol.prepareCommit()];
  // Both frames leave in the same tick on two connections; which one the server sees
  // first is up to the network, so the submission order is shuffled too.
  const bobFirst = Math.random() < 0.5;
  const [rb, rc] = bobFirst
    ? await Promise.all([bob.submitCommit(pb), carol.submitCommit(pc)])
    : await Promise.all([carol.submitCommit(pc), bob.submitCommit(pb)]).then(([c, b]) => [b, c]);
  const outcomes = [
    { m: bob, r: rb, p: pb },
    { m: carol, r: rc, p: pc },
  ];
  const winners = outcomes.filter((o) => o.r.ok);
  const losers = outcomes.filter((o) => !o.r.ok);
  check(winners.length === 1 && losers.length === 1, `exactly one winner: ${JSON.stringify([rb, rc])}`);
  const [win] = winners;
  const [lose] = losers;
  check(lose.r.code === 5004, `loser got ${lose.r.code}, expected 5004`);
  check(win.r.epoch === raceEpoch, "winner committed in the raced epoch");
  await lose.m.until(() => lose.m.epoch === raceEpoch + 1, 10_000, "the winning commit");
  const retry = await lose.m.commit();
  check(retry.ok && retry.epoch === raceEpoch + 1, `retry accepted at the new epoch: ${JSON.stringify(retry)}`);
  // The stale commit replayed after the retry is still refused.
  const replay = await lose.m.submitCommit(lose.p);
  check(!replay.ok && replay.code === 5004, `replayed stale commit refused with 5004: ${JSON.stringify(replay)}`);
  await allAtEpoch(all, raceEpoch + 2);
  result.race = step("race: one 5004, loser processed the winner and retried", {
    epoch: raceEpoch,
    winner: win.m.name,
    loser: lose.m.name,
    winner_result: win.r,
    loser_error: { code: lose.r.code, message: lose.r.message },
    retry,
    replay_error: { code: replay.code, message: replay.message },
    epoch_errors: [rb, rc].filter((r) => !r.ok).length,
  });

  // 8. Storm: all three commit at once; each retries on 5004 until accepted.
  const stormEpoch = alice.epoch;
  const storm = await Promise.all(all.map((m) => m.commitWithRetry()));
  await allAtEpoch(all, stormEpoch + 3);
  const stormEpochs = storm.map((s) => s.epoch).sort((a, b) => a - b);
  check(JSON.stringify(stormEpochs) === JSON.stringify([stormEpoch, stormEpoch + 1, stormEpoch + 2]), `storm epochs ${stormEpochs}`);
  for (const s of storm) for (const f of s.failures) check(f.code === 5004, `storm failure code ${f.code}`);
  result.storm = step("storm: three concurrent committers converged", {
    from_epoch: stormEpoch,
    accepted_epochs: Object.fromEntries(all.map((m, i) => [m.name, storm[i].epoch])),
    epoch_mismatch_errors: storm.reduce((n, s) => n + s.failures.length, 0),
  });

  // 9. Messages at the post-race epoch.
  result.messages.push(await exchange(all, "round2"));
  step("round 2 messages decrypted by every member");

  // 10. Commit bundles are all-or-nothing: a bad part refuses the commit, the epoch and
  // the stored GroupInfo stay; then a PublicMessage commit (not a PrivateMessage) is accepted.
  const e0 = alice.epoch;
  const asGroupInfo = (groupInfo) => encodeMlsMessage({ version: "mls10", wireformat: "mls_group_info", groupInfo });
  const bundle = {};
  const probe = async (name, mutate, code) => {
    const p = await alice.prepareCommit({ publicMessage: true }); // no AEAD nonce reuse on retries
    const r = await alice.submitCommit({ ...p, fields: mutate(p.fields) });
    check(!r.ok && r.code === code, `${name}: expected ${code}, got ${JSON.stringify(r)}`);
    const epoch = await alice.serverEpoch();
    check(epoch === e0, `${name}: server epoch moved to ${epoch}`);
    const gi = await alice.conn.request("MLS_GROUP_INFO_FETCH", { conversation_id: alice.conversationId }, { expect: "MLS_GROUP_INFO" });
    check(gi.epoch === e0, `${name}: stored GroupInfo now at epoch ${gi.epoch}`);
    bundle[name] = { code: r.code, message: r.message };
  };
  const staleGroupInfo = asGroupInfo(await createGroupInfoWithExternalPubAndRatchetTree(alice.state, [], alice.impl));
  await probe("group_info_for_old_epoch", (f) => ({ ...f, group_info: staleGroupInfo }), 5002);
  await probe("group_info_not_group_info", (f) => ({ ...f, group_info: f.commit_data }), 5002);
  const welcomeData = alice.lastWelcomeData; // a real mls_welcome (the one that added carol)
  await probe(
    "welcome_other_conversation",
    (f) => ({ ...f, welcomes: [{ conversation_id: "01NOSUCHCONVERSATION0000000", recipient_id: bob.userId, welcome_data: welcomeData }] }),
    5003,
  );
  await probe(
    "welcome_not_welcome",
    (f) => ({ ...f, welcomes: [{ conversation_id: f.conversation_id, recipient_id: bob.userId, welcome_data: f.commit_data }] }),
    5003,
  );
  if (args["outsider-user-id"]) {
    await probe(
      "welcome_non_member",
      (f) => ({ ...f, welcomes: [{ conversation_id: f.conversation_id, recipient_id: args["outsider-user-id"], welcome_data: welcomeData }] }),
      4003,
    );
  }
  {
    // An application message is not a commit.
    const app = await createApplicationMessage(alice.state, new Uint8Array([1]), alice.impl);
    alice.state = app.newState; // that generation's key is used up even though the DS refuses it
    const appBytes = encodeMlsMessage({ version: "mls10", wireformat: "mls_private_message", privateMessage: app.privateMessage });
    await probe("application_message_as_commit", (f) => ({ ...f, commit_data: appBytes }), 5002);
  }
  const publicCommit = await alice.commit({ publicMessage: true });
  check(publicCommit.ok && publicCommit.epoch === e0, `PublicMessage commit: ${JSON.stringify(publicCommit)}`);
  await allAtEpoch(all, e0 + 1);
  result.bundles = step("bundles: bad parts refused atomically; PublicMessage commit accepted", {
    epoch: e0,
    refused: bundle,
    public_message_commit: publicCommit,
  });

  // 11. External join: carol forgets her group state and rejoins from the stored GroupInfo.
  const before = carol.epoch;
  const rejoin = await carol.rejoinExternal();
  check(rejoin.ok && rejoin.groupInfoEpoch === before && rejoin.epoch === before, `external commit: ${JSON.stringify(rejoin)}`);
  await allAtEpoch(all, before + 1);
  check(carol.joinedEpoch === before + 1, "carol rejoined at the new epoch");
  result.messages.push(await exchange([carol, alice, bob], "round3"));
  result.external_join = step("external join: carol rejoined and exchanged messages", {
    supported: true,
    group_info_epoch: rejoin.groupInfoEpoch,
    commit_epoch: rejoin.epoch,
    rejoined_epoch: carol.epoch,
  });

  // 12. Consistency: every member at the server's epoch with the same epoch authenticator.
  const serverEpoch = await alice.serverEpoch();
  const gi = await bob.conn.request("MLS_GROUP_INFO_FETCH", { conversation_id: bob.conversationId }, { expect: "MLS_GROUP_INFO" });
  for (const m of all) check(m.epoch === serverEpoch, `${m.name} at epoch ${m.epoch}, server at ${serverEpoch}`);
  const auths = new Set(all.map((m) => m.epochAuthenticator));
  check(auths.size === 1, "every member derived the same epoch authenticator");
  check(gi.epoch === serverEpoch, `stored GroupInfo epoch ${gi.epoch} == server epoch ${serverEpoch}`);
  for (const m of all) {
    const tree = m.summary().members_in_tree.sort();
    check(JSON.stringify(tree) === JSON.stringify(all.map((x) => x.userId).sort()), `${m.name} tree: ${tree}`);
  }
  result.server_epoch = serverEpoch;
  result.group_info_epoch = gi.epoch;
  result.members = Object.fromEntries(all.map((m) => [m.name, m.summary()]));
  step("consistent final state");

  await Promise.all(all.map((m) => m.close()));
  result.ok = true;
  result.elapsed_ms = Date.now() - t0;
}

function flip(sig) {
  const out = new Uint8Array(sig);
  out[0] ^= 0x01;
  return out;
}

main().then(
  () => {
    clearTimeout(watchdog);
    finish(0);
  },
  (err) => {
    clearTimeout(watchdog);
    result.error = String(err && err.stack ? err.stack : err);
    finish(1);
  },
);
