"""benchmarks/grootv_authors_logits.py prepares the GrootVL authors' kernel sources faithfully:
their files copied with only the listed substitutions, each missing header written as the
declarations of the functions its source defines, the GrootL sources taken only when needed,
GrootL's headers never; its einops stand-ins agree with plain reshapes and permutes."""
import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "grootv_authors_logits", ROOT / "benchmarks" / "grootv_authors_logits.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

VISION = """\
#pragma once
#include <torch/extension.h>
#include "bfs.h"
#include "mst.h"
#include "refine.h"
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("bfs_forward", &bfs_forward, "bfs_forward");
    m.def("mst_forward", &mst_forward, "mst_forward");
}
"""
BFS = """\
#include <THC/THCAtomics.cuh>
// bfs_forward(int unused) { a comment, not a definition }
__global__ void walk_kernel(int * index, int n){ index[0] = n; }
static int helper(int a) { return a; }

std::tuple<at::Tensor, at::Tensor>
bfs_forward(
    const at::Tensor & edge_index_tensor,   /* edges */
    int max_adj_per_node){
    AT_CHECK(max_adj_per_node > 0, "// not a comment");
    int * e = edge_index_tensor.contiguous().data<int>();
    return std::make_tuple(edge_index_tensor, edge_index_tensor);
}
"""
REFINE_H = "#pragma once\nextern at::Tensor refine_forward(const at::Tensor & x);\n"
MST = """\
#include <THC/THCAtomics.cuh>
#include "boruvka.h"
template <typename scalar_t>
static void forward_kernel(int * edge_index, int * edge_out){
    struct Graph * g = createGraph(2, 1);
    boruvkaMST(g, edge_out);
}

// the tree
at::Tensor mst_forward(const at::Tensor & edge_index_tensor,
                       int vertex_count){
    int * out = edge_index_tensor.data<int>();
    return edge_index_tensor;
}
"""
BORUVKA = """\
#include "boruvka.h"
struct subset { int parent; int rank; };
int find(struct subset subsets[], int i);
void boruvkaMST(struct Graph* graph, int * edge_out)
{
    edge_out[0] = find(nullptr, graph->V);
}
struct Graph* createGraph(int V, int E)
{
    return new Graph;
}
int find(struct subset subsets[], int i) { return i; }
"""
GROOTL_BFS_H = ("#pragma once\nextern std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>"
                " bfs_forward(const at::Tensor & e, int k);\n")


def _repo(tmp_path, vision=VISION):
    """A checkout with their layout: GrootV's kernel folder lacking bfs.h / mst.h and mst.cu,
    GrootL's holding mst.cu, boruvka.cu and a bfs.h that disagrees with GrootV's bfs.cu."""
    grootv = tmp_path / "repo" / bench.KERNELS
    grootl = tmp_path / "repo" / bench.LANGUAGE_KERNELS
    grootv.mkdir(parents=True)
    grootl.mkdir(parents=True)
    for folder, files in ((grootv, {"vision.cpp": vision, "bfs.cu": BFS, "refine.h": REFINE_H,
                                    "notes.txt": "not a source"}),
                          (grootl, {"mst.cu": MST, "boruvka.cu": BORUVKA,
                                    "bfs.h": GROOTL_BFS_H, "unused.cu": "int unused;\n"})):
        for name, text in files.items():
            (folder / name).write_text(text)
    return tmp_path / "repo"


def _compat(text):
    for old, new in bench.COMPAT:
        text = text.replace(old, new)
    return text


def test_their_sources_are_copied_with_only_the_substitutions(tmp_path):
    dst = tmp_path / "csrc"
    sources = bench.prepare_kernel_sources(_repo(tmp_path), dst)
    assert sources == [dst / n for n in ("vision.cpp", "bfs.cu", "boruvka.cu", "mst.cu")]
    assert sorted(p.name for p in dst.iterdir()) == [
        "bfs.cu", "bfs.h", "boruvka.cu", "boruvka.h", "mst.cu", "mst.h", "refine.h",
        "vision.cpp"]
    for name, original in (("vision.cpp", VISION), ("bfs.cu", BFS), ("refine.h", REFINE_H),
                           ("mst.cu", MST), ("boruvka.cu", BORUVKA)):
        assert (dst / name).read_text() == _compat(original)
    bfs = (dst / "bfs.cu").read_text()
    assert "#include <ATen/cuda/Atomic.cuh>" in bfs and "TORCH_CHECK(" in bfs
    assert ".data_ptr<int>()" in bfs and "THC" not in bfs and "AT_CHECK" not in bfs


def test_missing_headers_declare_the_functions_their_sources_define(tmp_path):
    dst = tmp_path / "csrc"
    bench.prepare_kernel_sources(_repo(tmp_path), dst)

    def declarations(name):
        return [l for l in (dst / name).read_text().splitlines() if l.startswith("extern")]

    # GrootV's bfs.cu (two tensors here), not GrootL's bfs.h (four)
    assert declarations("bfs.h") == [
        ("extern std::tuple<at::Tensor, at::Tensor> bfs_forward(const at::Tensor & "
         "edge_index_tensor, int max_adj_per_node);")]
    assert declarations("mst.h") == [
        "extern at::Tensor mst_forward(const at::Tensor & edge_index_tensor, int vertex_count);"]
    assert declarations("boruvka.h") == [
        "extern struct Graph* createGraph(int V, int E);",
        "extern void boruvkaMST(struct Graph* graph, int * edge_out);"]
    assert bench.GRAPH_STRUCTS in (dst / "boruvka.h").read_text()
    assert bench.GRAPH_STRUCTS not in (dst / "mst.h").read_text()
    assert "#include <torch/extension.h>" in (dst / "mst.h").read_text()


def test_a_header_no_source_answers_is_named(tmp_path):
    repo = _repo(tmp_path, VISION.replace('"refine.h"', '"scan.h"'))
    with pytest.raises(FileNotFoundError, match="scan.h"):
        bench.prepare_kernel_sources(repo, tmp_path / "csrc")
    repo = _repo(tmp_path / "b")
    (repo / bench.LANGUAGE_KERNELS / "mst.cu").unlink()
    with pytest.raises(FileNotFoundError, match="mst.cu"):
        bench.prepare_kernel_sources(repo, tmp_path / "csrc")
    with pytest.raises(FileNotFoundError, match="checkout of the GrootVL"):
        bench.prepare_kernel_sources(tmp_path / "elsewhere", tmp_path / "csrc")


@pytest.mark.parametrize("name, message", [
    ("missing", "found 0"), ("forward_kernel", "cannot be declared"),
    ("walk_kernel", "cannot be declared"), ("helper", "cannot be declared"),
    ("twice", "found 2")])
def test_declaration_refuses_what_another_file_cannot_call(name, message):
    source = MST + BFS + "int twice(int a) { return a; }\nint twice(int a) { return 1; }\n"
    with pytest.raises(ValueError, match=message):
        bench.declaration(source, name)


def test_einops_stand_ins_agree_with_reshape_and_permute():
    x = torch.randn(2, 6, 3, 4)
    torch.testing.assert_close(bench.rearrange(x, "b (k d) h w -> b k d (h w)", k=2),
                               x.reshape(2, 2, 3, 12), rtol=0, atol=0)
    torch.testing.assert_close(bench.rearrange(x, "b c h w -> b (h w) c"),
                               x.permute(0, 2, 3, 1).reshape(2, 12, 6), rtol=0, atol=0)
    y = torch.randn(3, 5)
    torch.testing.assert_close(bench.repeat(y, "d n -> r d n", r=4),
                               y.unsqueeze(0).expand(4, 3, 5), rtol=0, atol=0)
    torch.testing.assert_close(bench.repeat(y, "d n -> (d r) n", r=2),
                               y.repeat_interleave(2, dim=0), rtol=0, atol=0)
