// The OpenAI-compatible Images API as a Node.js application sees it, with the official `openai` npm
// package. Usage: node openai_images.js BASE_URL  -> prints one JSON line of what it observed.
const { OpenAI, BadRequestError } = require("openai");

async function main() {
  const client = new OpenAI({ baseURL: process.argv[2], apiKey: "unused", maxRetries: 0 });
  const out = {};
  const models = await client.models.list();
  out.models = models.data.map((m) => m.id);
  // Z-Image parameters the API lacks travel as extra body fields (plain keys in JavaScript).
  const result = await client.images.generate({ prompt: "一只红色的狐狸", n: 2, size: "128x64", seed: 42, steps: 2 });
  out.generate = result.data.map((d) => {
    const png = Buffer.from(d.b64_json, "base64");
    // PNG: width and height are the big-endian words at bytes 16 and 20 of the IHDR chunk.
    return { seed: d.seed, png: png.subarray(1, 4).toString(), width: png.readUInt32BE(16), height: png.readUInt32BE(20) };
  });
  const stream = await client.images.generate({ prompt: "a fox", size: "64x64", stream: true, partial_images: 1, steps: 2 });
  out.events = [];
  for await (const event of stream) out.events.push(event.type);
  try {
    await client.images.generate({ prompt: "a fox", size: "100x100" });
  } catch (err) {
    out.invalid = { bad_request: err instanceof BadRequestError, status: err.status, param: err.param };
  }
  console.log(JSON.stringify(out));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
