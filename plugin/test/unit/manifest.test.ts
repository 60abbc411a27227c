// The npm package name and the manifest id agree, by OpenClaw's own rule (the id equals the
// package name or its unscoped part), so installing logs no "manifest id differs" notice and
// the config key is the same whichever of the two a user reads.

import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";

const read = (name: string) =>
  JSON.parse(readFileSync(new URL(`../../${name}`, import.meta.url), "utf8"));

test("the package name matches the manifest id", () => {
  const id: string = read("openclaw.plugin.json").id;
  const name: string = read("package.json").name;
  const unscoped = name.slice(name.lastIndexOf("/") + 1);
  assert.equal(unscoped, id, `package ${name} vs manifest id ${id}`);
});
