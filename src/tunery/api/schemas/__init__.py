"""Wire models of the Gemini REST surface, one module per noun, split by direction: requests in
(`…In`, `…Request`, `…Create`, `…Patch`), resources out.

Requests accept lowerCamelCase and proto snake_case keys alike and ignore fields we do not use;
responses are lowerCamelCase with `None` fields left out (`wire`). Conversions to and from the
domain live beside the model they build, so routes stay thin.
"""
