// Load a moerun model.onnx with onnxruntime-node, run it on the inputs in a JSON file, write the outputs.
// usage: node run_model.mjs MODEL.onnx INPUTS.json OUTPUTS.json
// INPUTS.json: {name: {"type": "int64"|"float32", "dims": [...], "data": [...]}}
import fs from "node:fs";
import ort from "onnxruntime-node";

const [modelPath, inputsPath, outputsPath] = process.argv.slice(2);
const spec = JSON.parse(fs.readFileSync(inputsPath, "utf8"));
const feeds = {};
for (const [name, { type, dims, data }] of Object.entries(spec)) {
  const values = type === "int64" ? BigInt64Array.from(data.map(BigInt)) : Float32Array.from(data);
  feeds[name] = new ort.Tensor(type, values, dims);
}
const session = await ort.InferenceSession.create(modelPath, { executionProviders: ["cpu"] });
const results = await session.run(feeds);
const out = {};
for (const [name, tensor] of Object.entries(results)) {
  out[name] = { dims: tensor.dims, data: Array.from(tensor.data, Number) };
}
fs.writeFileSync(outputsPath, JSON.stringify(out));
