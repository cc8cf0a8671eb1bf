import fastbert.cli


def test_encode_prints_similarities(capsys):
    assert fastbert.cli.main(["encode", "--device", "cpu", "A man plays guitar.", "Someone plays an instrument.", "Stocks fell."]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("A man", "Someone", "Stocks"))]
    sims = [[float(x) for x in row.split()[-3:]] for row in rows]
    assert sims[0][0] == 1.0 and sims[0][1] > sims[0][2]  # related sentences score higher


def test_bad_model_path_is_a_clear_error(capsys, tmp_path):
    assert fastbert.cli.main(["encode", "--model", str(tmp_path / "missing"), "x"]) == 2
    assert "is not a folder" in capsys.readouterr().err
