// The official openai npm package against the runtime's issue-14 APIs.
// MODE=generate (the shared server): a named tool_choice streamed (deltas
// reassembled), tool_choice "required" not streamed, responses.create
// streamed and not. MODE=embed (the pooling server): embeddings as floats
// and as the SDK's default base64 (which it decodes), a batch, dimensions.
// Prints one JSON object; the Python test validates it (tool arguments
// against the tool's JSON schema).
import OpenAI from "openai";

const client = new OpenAI({
  apiKey: process.env.RUNTIME_API_KEY,
  baseURL: process.env.RUNTIME_BASE_URL,
  maxRetries: 0,
  timeout: 300_000,
});
const model = process.env.RUNTIME_MODEL;
const out = {};

async function generate() {
  const tools = [JSON.parse(process.env.RUNTIME_TOOL)];
  const messages = [{ role: "user", content: "What is the weather in Paris?" }];
  const name = tools[0].function.name;

  const stream = await client.chat.completions.create({
    model, messages, tools, tool_choice: { type: "function", function: { name } },
    max_tokens: 120, temperature: 0, stream: true,
  });
  const named = { name: null, arguments: "", ids: [] };
  for await (const chunk of stream) {
    for (const call of (chunk.choices[0] && chunk.choices[0].delta.tool_calls) || []) {
      if (call.id) named.ids.push(call.id);
      if (call.function && call.function.name) named.name = call.function.name;
      if (call.function && call.function.arguments) named.arguments += call.function.arguments;
    }
  }
  out.named = named;

  const required = await client.chat.completions.create({
    model, messages, tools, tool_choice: "required", max_tokens: 120, temperature: 0,
  });
  const call = required.choices[0].message.tool_calls[0];
  out.required = { name: call.function.name, arguments: call.function.arguments, finish: required.choices[0].finish_reason };

  const response = await client.responses.create({ model, input: "Say hello.", max_output_tokens: 6, temperature: 0 });
  out.responses = { text: response.output_text, outputTokens: response.usage.output_tokens, object: response.object };

  const events = await client.responses.create({ model, input: "Say hello.", max_output_tokens: 6, temperature: 0, stream: true });
  let text = "";
  const types = [];
  for await (const event of events) {
    types.push(event.type);
    if (event.type === "response.output_text.delta") text += event.delta;
  }
  out.responsesStream = { text, first: types[0], last: types[types.length - 1] };
}

async function embed() {
  const floats = await client.embeddings.create({ model, input: "The capital of France is Paris.", encoding_format: "float" });
  const decoded = await client.embeddings.create({ model, input: "The capital of France is Paris." }); // SDK default: base64
  const batch = await client.embeddings.create({ model, input: ["one", "two", "one"], encoding_format: "float" });
  const short = await client.embeddings.create({ model, input: "one", dimensions: 128, encoding_format: "float" });
  out.float = floats.data[0].embedding;
  out.base64 = decoded.data[0].embedding;
  out.batch = batch.data.map((d) => ({ index: d.index, embedding: d.embedding }));
  out.usage = floats.usage;
  out.dimensions = short.data[0].embedding.length;
}

if (process.env.MODE === "embed") await embed();
else await generate();
console.log(JSON.stringify(out));
