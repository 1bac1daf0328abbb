"""`python -m mqb.models`: parameter counts and layer census computed from the instantiated networks."""

from monai.networks.nets import UNet

from mqb.models.__main__ import census, main


def test_census_counts_parameters_and_layers():
    unet = census("unet", 14)
    direct = UNet(3, 1, 14, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2, norm="batch")
    assert unet["params"] == sum(p.numel() for p in direct.parameters())
    mesh = census("meshnet_18cls", 18)
    assert mesh["params"] == 96_408 and mesh["layers"] == {"conv3x3x3": 9, "conv1x1x1": 1}


def test_cli_table_and_bad_name(capsys):
    assert main(["meshnet_gwm", "segresnet"]) == 0
    out = capsys.readouterr().out
    assert "5,598" in out and "SegResNet" in out
    assert main(["medformerx"]) == 2
