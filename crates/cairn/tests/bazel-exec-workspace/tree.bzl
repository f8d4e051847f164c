"""`tree`: a rule whose one output is a directory (Bazel 4 genrules cannot declare one)."""

def _tree_impl(ctx):
    out = ctx.actions.declare_directory(ctx.label.name)
    ctx.actions.run_shell(
        outputs = [out],
        inputs = [ctx.file.src],
        arguments = [out.path, ctx.file.src.path],
        command = """
            set -e
            mkdir -p "$1/nested/deeper"
            echo alpha > "$1/alpha.txt"
            tr a-z A-Z < "$2" > "$1/nested/shout.txt"
            printf '#!/bin/sh\\necho run from the tree\\n' > "$1/nested/deeper/tool.sh"
            chmod +x "$1/nested/deeper/tool.sh"
            ln -s alpha.txt "$1/link.txt"
        """,
        mnemonic = "MakeTree",
    )
    return [DefaultInfo(files = depset([out]), runfiles = ctx.runfiles(files = [out]))]

tree = rule(
    implementation = _tree_impl,
    attrs = {"src": attr.label(allow_single_file = True, mandatory = True)},
)
