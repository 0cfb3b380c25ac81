"""What operators run: the command line (:mod:`.cli`), ``cdc slot`` (:mod:`.slot`),
``cdc verify`` (:mod:`.verify`) and the start-up checks (:mod:`.checks`). May import
every other stage; nothing imports it but ``cdc.__main__``."""
