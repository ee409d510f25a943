"""`edgekit info`: open a bundle as a device would and show its manifest (device side)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("info", help="verify a bundle and show its manifest")
    p.add_argument("bundle")
    p.set_defaults(run=_run_info)


def _run_info(args) -> int:
    from edgekit.device import Model

    model = Model(args.bundle, threads=1)  # opens everything a device would: hashes, graph, tokenizer, prefix
    m = model.manifest
    a = m.architecture
    print(f"bundle        {args.bundle} ({model.bundle_hash}), format {m.format_version}, all files verified "
          "(hashes, graph, tokenizer)")
    print(f"architecture  {a.model_type}: {a.num_layers} layers, hidden {a.hidden_size}, heads {a.num_heads}/"
          f"{a.num_kv_heads} kv, head size {a.head_size}, vocab {a.vocab_size}, context {a.context_length}")
    print(f"quantization  {m.quantization.label}")
    print(f"graph         {m.graph.flavour}, opset {m.graph.opset}")
    print(f"target        {m.target.name}")
    print(f"chat          {'yes' if m.chat else 'no'}")
    for name, digest in sorted(m.files.items()):
        print(f"  {digest[:16]}  {name}")
    return 0
