// A Node.js client generated at run time from protos/ (no Python involved): the API as other
// languages see it. Usage: node client.js HOST:PORT  -> prints one JSON line of what it observed.
const path = require("path");
const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");

const root = path.resolve(__dirname, "..", "..", "protos");
const definition = loader.loadSync("zimage/v1/zimage.proto", {
  includeDirs: [root], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
});
const zimage = grpc.loadPackageDefinition(definition).zimage.v1;
const client = new zimage.ImageGenerationService(process.argv[2], grpc.credentials.createInsecure());

function unary(method, request) {
  return new Promise((resolve, reject) =>
    client[method](request, (err, response) => (err ? reject(err) : resolve(response))));
}

async function main() {
  const out = {};
  const info = await unary("GetModelInfo", {});
  out.model = info.model_id;
  out.default_steps = info.defaults.steps;
  const result = await unary("Generate", { prompt: "一只红色的狐狸", width: 64, height: 64, steps: 2, seed: "42" });
  out.generate = { seed: result.images[0].seed, mime: result.images[0].mime_type, bytes: result.images[0].data.length };
  try {
    await unary("Generate", { prompt: "", width: 100 });
  } catch (err) {
    out.invalid = { code: err.code, details: err.details };
  }
  out.events = await new Promise((resolve, reject) => {
    const kinds = [];
    const call = client.StreamProgress({ prompt: "a lighthouse", width: 64, height: 64, steps: 3, seed: "42",
                                         preview: { every_n_steps: 1 } });
    call.on("data", (event) => kinds.push(event.event + (event.step ? ":" + event.step.previews.length : "")));
    call.on("end", () => resolve(kinds));
    call.on("error", reject);
  });
  console.log(JSON.stringify(out));
  client.close();
}

main().catch((err) => { console.error(err); process.exit(1); });
