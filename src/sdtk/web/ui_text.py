"""The web app's page labels in English, Japanese, Chinese (simplified) and Russian: one table,
one row per string (`key | en | ja | zh | ru`), `{name}` for the values filled in. The inspect
report itself comes from sdtk.report.messages, in the same four languages.

The page language is chosen on the page (the language menu in the header sets the `sdtk_lang`
cookie through POST /lang); `?lang=xx` in an address overrides it for that page (the model page's
report links); without either, the browser's Accept-Language decides; else English.
Plural forms: keys ending in .one/.few/.many, chosen by `plural_form` (CLDR plural rules: English
one/other, Japanese and Chinese other only, Russian one/few/many)."""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

LANGS: Tuple[str, ...] = ("en", "ja", "zh", "ru")
LANG_NAMES = {"en": "English", "ja": "日本語", "zh": "中文", "ru": "Русский"}
LANG_COOKIE = "sdtk_lang"

TABLE = """
# key | en | ja | zh | ru
nav.main | Main | メイン | 主菜单 | Главное меню
nav.library | Library | ライブラリ | 模型库 | Библиотека
nav.jobs | Jobs | ジョブ | 任务 | Задачи
nav.dupes | Duplicates | 重複 | 重复文件 | Дубликаты
nav.skip | Skip to content | 本文へ移動 | 跳到正文 | К содержимому
nav.index | Index folders | フォルダーを索引化 | 索引文件夹 | Индексировать папки
nav.index_title | Rescan {roots} | {roots} を再スキャン | 重新扫描 {roots} | Пересканировать {roots}
nav.language | Language | 言語 | 语言 | Язык
queue.connecting | connecting… | 接続中… | 正在连接… | подключение…
queue.empty | No jobs yet. | ジョブはまだありません。 | 暂无任务。 | Задач пока нет.
back.library | ← Library | ← ライブラリ | ← 模型库 | ← Библиотека
back.jobs | ← Jobs | ← ジョブ | ← 任务 | ← Задачи
common.none | none | なし | 无 | нет
common.choose | choose… | 選択… | 请选择… | выберите…
common.keep | keep | そのまま | 保持不变 | оставить
common.copy | Copy | コピー | 复制 | Копировать
common.copy_what | Copy {what} | {what} をコピー | 复制 {what} | Копировать: {what}
common.overwrite | replace an existing file | 既存のファイルを置き換える | 替换已有文件 | заменить существующий файл
common.output | Output | 出力 | 输出 | Вывод
common.preset | Preset | プリセット | 预设 | Пресет
filter.search | Search | 検索 | 搜索 | Поиск
filter.placeholder | name, title, trigger word, architecture, hash | 名前、タイトル、トリガーワード、アーキテクチャ、ハッシュ | 名称、标题、触发词、架构、哈希 | имя, название, триггерное слово, архитектура, хеш
filter.kind | Kind | 種類 | 类型 | Тип
filter.architecture | Architecture | アーキテクチャ | 架构 | Архитектура
filter.any | any | すべて | 全部 | любой
filter.sort | Sort | 並べ替え | 排序 | Сортировка
filter.problems | with problems | 問題あり | 有问题 | с проблемами
filter.dupes | duplicates | 重複あり | 有重复 | дубликаты
filter.submit | Filter | 絞り込み | 筛选 | Фильтр
sort.path | folder and name | フォルダーと名前 | 文件夹和名称 | папка и имя
sort.size | largest first | 大きい順 | 从大到小 | сначала большие
sort.size-asc | smallest first | 小さい順 | 从小到大 | сначала маленькие
sort.architecture | architecture | アーキテクチャ | 架构 | архитектура
sort.kind | kind | 種類 | 类型 | тип
sort.recent | newest first | 新しい順 | 最新优先 | сначала новые
files.one | {n} file | {n} 件 | {n} 个文件 | {n} файл
files.few | {n} files | {n} 件 | {n} 个文件 | {n} файла
files.many | {n} files | {n} 件 | {n} 个文件 | {n} файлов
results.caption | Model files | モデルファイル | 模型文件 | Файлы моделей
results.none | No file matches. Index a folder (button above) or change the filters. | 一致するファイルがありません。フォルダーを索引化する（上のボタン）か、絞り込みを変えてください。 | 没有匹配的文件。请索引文件夹（上方按钮）或更改筛选条件。 | Нет подходящих файлов. Проиндексируйте папку (кнопка выше) или измените фильтры.
results.more | Show more ({n} left) | さらに表示（残り {n}） | 显示更多（还剩 {n}） | Показать ещё (осталось {n})
col.preview | Preview | プレビュー | 预览 | Превью
col.name | Name | 名前 | 名称 | Имя
col.kind | Kind | 種類 | 类型 | Тип
col.architecture | Architecture | アーキテクチャ | 架构 | Архитектура
col.precision | Precision | 精度 | 精度 | Точность
col.size | Size | サイズ | 大小 | Размер
col.trigger | Trigger words | トリガーワード | 触发词 | Триггерные слова
col.status | Status | 状態 | 状态 | Состояние
col.component | Component | コンポーネント | 组件 | Компонент
col.prefix | Prefix | 接頭辞 | 前缀 | Префикс
col.tensors | Tensors | テンソル数 | 张量数 | Тензоры
col.parameters | Parameters | パラメーター数 | 参数量 | Параметры
col.dtypes | dtypes | データ型 | 数据类型 | Типы данных
col.job | Job | ジョブ | 任务 | Задача
col.state | State | 状態 | 状态 | Состояние
col.started | Started | 開始 | 开始 | Начало
col.finished | Finished | 終了 | 结束 | Конец
col.result | Result | 結果 | 结果 | Результат
badge.unsafe | unreadable or unsafe | 読めないか危険 | 无法读取或不安全 | нечитаемый или опасный
badge.ok | ok | OK | 正常 | ок
problems.one | {n} problem | 問題 {n} 件 | {n} 个问题 | {n} проблема
problems.few | {n} problems | 問題 {n} 件 | {n} 个问题 | {n} проблемы
problems.many | {n} problems | 問題 {n} 件 | {n} 个问题 | {n} проблем
severity.error | error | エラー | 错误 | ошибка
severity.warning | warning | 警告 | 警告 | предупреждение
severity.info | note | 注記 | 提示 | замечание
model.report_language | Report language | レポートの言語 | 报告语言 | Язык отчёта
model.unsafe_title | Unsafe file | 危険なファイル | 不安全的文件 | Опасный файл
model.unsafe_refused | sdtk refused to read this file: {reason} | sdtk はこのファイルの読み込みを拒否しました: {reason} | sdtk 拒绝读取此文件：{reason} | sdtk отказался читать этот файл: {reason}
model.unsafe_explain | Nothing in it was executed. Programs that load it with torch.load may run the code hidden in it. Delete it or keep it away from other tools. | 中身は何も実行されていません。torch.load で読み込むプログラムは、中に隠されたコードを実行するおそれがあります。削除するか、他のツールから遠ざけてください。 | 其中的任何内容都未被执行。用 torch.load 加载它的程序可能会运行其中隐藏的代码。请删除它，或让其他工具远离它。 | Ничего из него не было выполнено. Программы, загружающие его через torch.load, могут выполнить скрытый в нём код. Удалите его или держите подальше от других инструментов.
model.unreadable | Unreadable | 読めません | 无法读取 | Не читается
model.report | Report | レポート | 报告 | Отчёт
model.chart_title | Size of each component | コンポーネントごとのサイズ | 各组件大小 | Размер каждого компонента
model.chart_caption | Component sizes (bytes on disk). | コンポーネントのサイズ（ディスク上のバイト数）。 | 组件大小（磁盘上的字节数）。 | Размеры компонентов (байты на диске).
model.actions | Actions | 操作 | 操作 | Действия
model.convert | Convert… | 変換… | 转换… | Конвертировать…
model.merge | Merge with… | マージ… | 合并… | Слить с…
model.bake_loras | Bake LoRAs… | LoRA を焼き込む… | 烘焙 LoRA… | Вшить LoRA…
model.bake_into | Bake into a model… | モデルに焼き込む… | 烘焙进模型… | Вшить в модель…
model.merge_loras | Merge with other LoRAs… | 他の LoRA とマージ… | 与其他 LoRA 合并… | Слить с другими LoRA…
model.resize_lora | Resize… | ランクを変更… | 调整秩… | Изменить ранг…
model.scan | Safety scan | 安全性スキャン | 安全扫描 | Проверка безопасности
model.hash | Hash again | 再ハッシュ | 重新计算哈希 | Пересчитать хеши
model.hashes | Hashes | ハッシュ | 哈希 | Хеши
model.sidecars | From the files beside it | 隣のファイルから | 来自旁边的文件 | Из соседних файлов
model.trigger_words | Trigger words | トリガーワード | 触发词 | Триггерные слова
model.base_model | Base model | ベースモデル | 基础模型 | Базовая модель
model.civitai_ids | model {model}, version {version} | モデル {model}、バージョン {version} | 模型 {model}，版本 {version} | модель {model}, версия {version}
model.preview_alt | Preview {i} of {name} | {name} のプレビュー {i} | {name} 的预览 {i} | Превью {i}: {name}
model.lineage | Lineage and recipes | 由来とレシピ | 来源与配方 | Происхождение и рецепты
model.metadata | Metadata | メタデータ | 元数据 | Метаданные
model.duplicates | Duplicates | 重複 | 重复文件 | Дубликаты
model.identical_file | (identical file) | （同一ファイル） | （相同文件） | (идентичный файл)
model.same_weights | (same weights, another file) | （同じ重み、別のファイル） | （相同权重，不同文件） | (те же веса, другой файл)
model.no_dupes | No other file in the library has the same bytes or the same weights. | ライブラリに同じバイトまたは同じ重みを持つ他のファイルはありません。 | 库中没有其他文件具有相同的字节或相同的权重。 | В библиотеке нет другого файла с теми же байтами или весами.
advice.convert_generation | Convert for generation | 生成用に変換 | 转换为生成用 | Конвертировать для генерации
advice.convert_safetensors | Convert to safetensors | safetensors に変換 | 转换为 safetensors | Конвертировать в safetensors
advice.fix_clip | Fix CLIP position ids | CLIP の position ids を修正 | 修复 CLIP position ids | Исправить position ids CLIP
convert.title | Convert {name} | {name} を変換 | 转换 {name} | Конвертация {name}
convert.format | Output format | 出力形式 | 输出格式 | Формат вывода
convert.to_safetensors | safetensors (one file; every option below) | safetensors（1 ファイル。下のすべてのオプションが使えます） | safetensors（单个文件；可用下方所有选项） | safetensors (один файл; все параметры ниже)
convert.to_gguf | GGUF: the diffusion model, quantized as city96's tools do | GGUF: 拡散モデルを city96 のツールと同じ方法で量子化 | GGUF：扩散模型，按 city96 工具的方式量化 | GGUF: диффузионная модель, квантованная как в инструментах city96
convert.to_fp8 | fp8-scaled (ComfyUI's per-layer scaled fp8) | fp8-scaled（ComfyUI のレイヤーごとにスケールされた fp8） | fp8-scaled（ComfyUI 的逐层缩放 fp8） | fp8-scaled (fp8 ComfyUI с масштабом для каждого слоя)
convert.to_diffusers | diffusers folder (loads offline) | diffusers フォルダー（オフラインで読み込めます） | diffusers 文件夹（可离线加载） | папка diffusers (загружается офлайн)
convert.quant | GGUF type | GGUF タイプ | GGUF 类型 | Тип GGUF
convert.variant | diffusers variant | diffusers バリアント | diffusers 变体 | Вариант diffusers
convert.format_note | GGUF and fp8-scaled take none of the options below (leave them as they are); a diffusers folder takes the precision and weight options. | GGUF と fp8-scaled では下のオプションは使えません（そのままにしてください）。diffusers フォルダーでは精度と重みのオプションが使えます。 | GGUF 和 fp8-scaled 不接受下方的任何选项（保持原样即可）；diffusers 文件夹接受精度和权重选项。 | GGUF и fp8-scaled не принимают параметров ниже (оставьте их как есть); папка diffusers принимает параметры точности и весов.
convert.preset_none | none (only the options below) | なし（下のオプションのみ） | 无（仅使用下方选项） | нет (только параметры ниже)
convert.preset_generation | generation: fp16, pruned, one weight set, CLIP fixed | 生成用: fp16、剪定済み、重みは 1 組、CLIP 修正済み | 用于生成：fp16、已修剪、单套权重、已修复 CLIP | для генерации: fp16, очищенная, один набор весов, CLIP исправлен
convert.preset_training | training: fp32, EMA kept | 学習用: fp32、EMA を保持 | 用于训练：fp32，保留 EMA | для обучения: fp32, EMA сохранена
convert.precision | Precision | 精度 | 精度 | Точность
convert.dtype_all | All floating tensors | すべての浮動小数点テンソル | 所有浮点张量 | Все тензоры с плавающей точкой
convert.dtype_unet | UNet / DiT | UNet / DiT | UNet / DiT | UNet / DiT
convert.dtype_vae | VAE | VAE | VAE | VAE
convert.dtype_te | Text encoders | テキストエンコーダー | 文本编码器 | Текстовые энкодеры
convert.allow_overflow | allow overflow to inf/NaN | inf/NaN へのオーバーフローを許可 | 允许溢出为 inf/NaN | разрешить переполнение до inf/NaN
convert.weights | Weights and keys | 重みとキー | 权重与键 | Веса и ключи
convert.ema | EMA copy | EMA コピー | EMA 副本 | Копия EMA
convert.ema_default | default | 既定 | 默认 | по умолчанию
convert.ema_keep | keep | 残す | 保留 | оставить
convert.ema_drop | drop | 捨てる | 丢弃 | удалить
convert.ema_use | use (EMA becomes the weights) | 使う（EMA を重みにする） | 使用（EMA 成为权重） | использовать (EMA становится весами)
convert.prune | prune (training state, EMA, unknown keys) | 剪定（学習状態、EMA、不明なキー） | 修剪（训练状态、EMA、未知键） | очистить (состояние обучения, EMA, неизвестные ключи)
convert.keep_unknown | keep unknown keys when pruning | 剪定時に不明なキーを残す | 修剪时保留未知键 | сохранять неизвестные ключи при очистке
convert.fix_clip | fix CLIP position ids and key names | CLIP の position ids とキー名を修正 | 修复 CLIP 的 position ids 和键名 | исправить position ids и имена ключей CLIP
convert.prediction | Prediction type | 予測タイプ | 预测类型 | Тип предсказания
convert.as_detected | as detected | 検出どおり | 按检测结果 | как определено
convert.parts | VAE and parts | VAE とパーツ | VAE 与部件 | VAE и части
convert.bake_vae | Bake this VAE in | この VAE を焼き込む | 烘焙此 VAE | Вшить этот VAE
convert.replace | Replace a part | パーツの差し替え | 替换部件 | Заменить часть
convert.replace_part | Take the | 差し替えるパーツ | 替换部件 | Взять часть
convert.replace_from | from | 取り出すファイル | 来自文件 | из файла
convert.replace_note | The same as --replace COMPONENT=FILE: the part's tensors are taken from the other file (LDM or diffusers layout; every tensor must be there with its shape), the rest of the model is kept. | --replace COMPONENT=FILE と同じです。そのパーツのテンソルを別のファイル（LDM または diffusers の形式。すべてのテンソルが同じ形で必要）から取り、モデルの残りはそのままです。 | 与 --replace COMPONENT=FILE 相同：该部件的张量取自另一个文件（LDM 或 diffusers 布局；每个张量都须存在且形状一致），模型其余部分保持不变。 | То же, что --replace COMPONENT=FILE: тензоры части берутся из другого файла (раскладка LDM или diffusers; каждый тензор должен быть там с той же формой), остальная модель сохраняется.
convert.extract | Extract as separate files: | 別ファイルとして抽出: | 提取为单独文件： | Извлечь в отдельные файлы:
convert.output_name | File name (beside the input; empty: named after what was done; .gguf for GGUF, a folder name for diffusers) | ファイル名（入力の隣。空欄なら処理内容から命名。GGUF は .gguf、diffusers はフォルダー名） | 文件名（与输入放在同一位置；留空则按所做操作命名；GGUF 用 .gguf，diffusers 用文件夹名） | Имя файла (рядом с исходным; пусто — по выполненным действиям; .gguf для GGUF, имя папки для diffusers)
convert.no_sidecar | no A1111 .yaml | A1111 用の .yaml を作らない | 不写 A1111 .yaml | без .yaml для A1111
convert.no_source_hash | skip the source hashes (lineage) | 入力のハッシュを省略（由来） | 跳过源文件哈希（来源记录） | пропустить хеши исходника (происхождение)
convert.hash_output | record the output's own hash | 出力自身のハッシュを記録 | 记录输出文件自身的哈希 | записать хеш самого результата
convert.start | Start converting | 変換を開始 | 开始转换 | Начать конвертацию
merge.title | Merge | マージ | 合并 | Слияние
merge.models | Models | モデル | 模型 | Модели
merge.a | A (primary: its keys, order and extras): | A（主モデル: キー、順序、その他を引き継ぐ）: | A（主模型：沿用其键、顺序和附加内容）： | A (основная: её ключи, порядок и дополнения):
merge.c | C (add-difference, triple-sum, sum-twice, train-difference) | C（add-difference、triple-sum、sum-twice、train-difference 用） | C（用于 add-difference、triple-sum、sum-twice、train-difference） | C (для add-difference, triple-sum, sum-twice, train-difference)
merge.no_candidates | No other file of this architecture ({arch}) in the library. | このアーキテクチャ（{arch}）の他のファイルはライブラリにありません。 | 库中没有此架构（{arch}）的其他文件。 | В библиотеке нет других файлов этой архитектуры ({arch}).
merge.method | Method | 方式 | 方法 | Метод
merge.alpha | Alpha (how much of B) | アルファ（B の割合） | Alpha（B 的比例） | Альфа (доля B)
merge.beta | Beta | ベータ | Beta | Бета
merge.beta_default | method default | 方式の既定値 | 方法默认值 | по умолчанию для метода
merge.seed | Seed (DARE) | シード（DARE） | 种子（DARE） | Сид (DARE)
merge.blocks | Block weights ({family}, {n}) | ブロックウェイト（{family}、{n}） | 分块权重（{family}，{n}） | Веса блоков ({family}, {n})
merge.use_blocks | use block weights for alpha | アルファにブロックウェイトを使う | 对 alpha 使用分块权重 | использовать веса блоков для альфы
merge.custom | custom | カスタム | 自定义 | свои
merge.no_blocks | Block weights: only for SD1, SD2, SDXL and FLUX models. | ブロックウェイトは SD1、SD2、SDXL、FLUX モデルのみです。 | 分块权重：仅适用于 SD1、SD2、SDXL 和 FLUX 模型。 | Веса блоков: только для моделей SD1, SD2, SDXL и FLUX.
merge.components | Components and output | コンポーネントと出力 | 组件与输出 | Компоненты и вывод
merge.te | Text encoder | テキストエンコーダー | 文本编码器 | Текстовый энкодер
merge.vae | VAE | VAE | VAE | VAE
merge.merge | merge | マージ | 合并 | слить
merge.exclude | Keys never merged (regex) | マージしないキー（正規表現） | 不合并的键（正则表达式） | Ключи, которые не сливаются (regex)
merge.dtype | Output precision | 出力の精度 | 输出精度 | Точность результата
merge.as_a | as A | A と同じ | 与 A 相同 | как у A
merge.output | Output file name (beside A) | 出力ファイル名（A の隣） | 输出文件名（与 A 放在同一位置） | Имя выходного файла (рядом с A)
merge.preview | Preview the recipe | レシピをプレビュー | 预览配方 | Просмотреть рецепт
merge.start | Start merging | マージを開始 | 开始合并 | Начать слияние
merge.recipe | Recipe | レシピ | 配方 | Рецепт
merge.recipe_hint | Preview it to see the YAML that sdtk merge --recipe runs. | プレビューすると、sdtk merge --recipe が実行する YAML が表示されます。 | 预览后可看到 sdtk merge --recipe 运行的 YAML。 | Нажмите «Просмотреть рецепт», чтобы увидеть YAML, который выполняет sdtk merge --recipe.
merge.export | Export recipe.yaml | recipe.yaml を書き出す | 导出 recipe.yaml | Экспорт recipe.yaml
sim.summary | How similar A and B are, per block (cosine; 1 = identical) | ブロックごとの A と B の類似度（コサイン、1 = 同一） | A 与 B 每个分块的相似度（余弦；1 = 完全相同） | Насколько похожи A и B по блокам (косинус; 1 = идентичны)
sim.job | diff job #{id} | diff ジョブ #{id} | diff 任务 #{id} | задача diff #{id}
sim.whole | Whole model: cosine {cosine}, relative L2 {l2}. | モデル全体: コサイン {cosine}、相対 L2 {l2}。 | 整个模型：余弦 {cosine}，相对 L2 {l2}。 | Вся модель: косинус {cosine}, относительная L2 {l2}.
sim.running | Comparing A and B per block: {state} {pct}% | ブロックごとに A と B を比較中: {state} {pct}% | 正在按分块比较 A 与 B：{state} {pct}% | Сравнение A и B по блокам: {state} {pct}%
sim.button | Compare A and B per block | ブロックごとに A と B を比較 | 按分块比较 A 与 B | Сравнить A и B по блокам
sim.hint | (reads both models once: the similarity of each block, to choose the weights) | （両モデルを 1 回ずつ読み、重みを選ぶためのブロックごとの類似度を出します） | （读取两个模型各一次：得到每个分块的相似度，用于选择权重） | (читает обе модели один раз: сходство каждого блока, чтобы выбрать веса)
job.label | Job {id}: {title} | ジョブ {id}: {title} | 任务 {id}：{title} | Задача {id}: {title}
job.progress | Progress of job {id} | ジョブ {id} の進捗 | 任务 {id} 的进度 | Ход задачи {id}
job.verdict | verdict: | 判定: | 结论： | вердикт:
job.cancel | Cancel | キャンセル | 取消 | Отменить
job.heading | Job #{id}: {title} | ジョブ #{id}: {title} | 任务 #{id}：{title} | Задача #{id}: {title}
job.log | Log | ログ | 日志 | Журнал
job.recipe | Recipe | レシピ | 配方 | Рецепт
job.hashes | Hashes | ハッシュ | 哈希 | Хеши
job.title_tag | Job {id} | ジョブ {id} | 任务 {id} | Задача {id}
state.queued | queued | 待機中 | 排队中 | в очереди
state.running | running | 実行中 | 运行中 | выполняется
state.done | done | 完了 | 完成 | готово
state.failed | failed | 失敗 | 失败 | ошибка
state.cancelled | cancelled | キャンセル済み | 已取消 | отменено
jobs.intro | Jobs run one at a time, in order. Cancel stops a job cleanly: the file it was writing is removed, nothing else changes. Finished jobs are also logged in {path}. | ジョブは 1 つずつ順番に実行されます。キャンセルするとジョブはきれいに止まり、書きかけのファイルは削除され、ほかは何も変わりません。終わったジョブは {path} にも記録されます。 | 任务按顺序逐个运行。取消会干净地停止任务：正在写入的文件会被删除，其他一切不变。已完成的任务也记录在 {path} 中。 | Задачи выполняются по одной, по порядку. Отмена останавливает задачу чисто: файл, который она писала, удаляется, больше ничего не меняется. Завершённые задачи также записываются в {path}.
dupes.reclaimable | Reclaimable: | 回収できる容量: | 可回收： | Можно освободить:
dupes.reclaimable_note | in identical files (hard links and symlinked folders counted once). | （同一ファイル分。ハードリンクとシンボリックリンクのフォルダーは 1 回だけ数えます） | （来自相同文件；硬链接和符号链接的文件夹只计一次）。 | в идентичных файлах (жёсткие ссылки и папки-симлинки считаются один раз).
dupes.how_trash | Removing moves a file and its sidecars to the system trash (to the quarantine folder .sdtk-quarantine/ of its root when its drive has no usable trash), with an undo log: nothing is ever deleted. | 削除すると、ファイルとその付属ファイルはシステムのごみ箱へ移動します（ドライブに使えるごみ箱がない場合はルートの隔離フォルダー .sdtk-quarantine/ へ）。取り消し記録が残り、完全に削除されることはありません。 | 移除会把文件及其附属文件移到系统回收站（若该驱动器没有可用的回收站，则移到其根目录的隔离文件夹 .sdtk-quarantine/），并记录撤销日志：不会永久删除任何文件。 | Удаление перемещает файл и его сопутствующие файлы в системную корзину (в папку карантина .sdtk-quarantine/ его корня, если на диске нет доступной корзины), с журналом отмены: ничего не удаляется навсегда.
dupes.how_quarantine | Removing moves a file and its sidecars to .sdtk-quarantine/ in its folder root, with an undo log: nothing is ever deleted. | 削除すると、ファイルとその付属ファイルはルートフォルダーの .sdtk-quarantine/ へ移動します。取り消し記録が残り、完全に削除されることはありません。 | 移除会把文件及其附属文件移到其根文件夹中的 .sdtk-quarantine/，并记录撤销日志：不会永久删除任何文件。 | Удаление перемещает файл и его сопутствующие файлы в .sdtk-quarantine/ в корне папки, с журналом отмены: ничего не удаляется навсегда.
dupes.identical | Identical files | 同一ファイル | 相同文件 | Идентичные файлы
dupes.identical_label | Identical files {hash} | 同一ファイル {hash} | 相同文件 {hash} | Идентичные файлы {hash}
dupes.identical_head | SHA256 {hash}… · {size} each · {reclaimable} reclaimable | SHA256 {hash}… · 各 {size} · {reclaimable} 回収可能 | SHA256 {hash}… · 每个 {size} · 可回收 {reclaimable} | SHA256 {hash}… · по {size} · можно освободить {reclaimable}
dupes.hard_links | (some are hard links of one file) | （一部は同じファイルのハードリンク） | （部分是同一文件的硬链接） | (некоторые — жёсткие ссылки на один файл)
dupes.no_identical | No identical files. | 同一ファイルはありません。 | 没有相同文件。 | Идентичных файлов нет.
dupes.weights | Same weights, different files | 同じ重み、別のファイル | 相同权重，不同文件 | Те же веса, разные файлы
dupes.weights_note | The same tensors in another container or with other metadata (a .ckpt and its .safetensors, a metadata edit). | 別の形式や別のメタデータに入った同じテンソル（.ckpt とその .safetensors、メタデータの編集など）。 | 相同的张量存放在另一种容器中或带有其他元数据（如 .ckpt 及其 .safetensors、编辑过的元数据）。 | Те же тензоры в другом контейнере или с другими метаданными (.ckpt и его .safetensors, правка метаданных).
dupes.weights_label | Same weights {hash} | 同じ重み {hash} | 相同权重 {hash} | Те же веса {hash}
dupes.weights_head | Content {hash}… · up to {size} reclaimable | 内容 {hash}… · 最大 {size} 回収可能 | 内容 {hash}… · 最多可回收 {size} | Содержимое {hash}… · можно освободить до {size}
dupes.no_weights | No file holds the same weights as another. | 同じ重みを持つファイルはありません。 | 没有文件与其他文件权重相同。 | Ни один файл не содержит тех же весов, что другой.
dupes.precision | Same weights at another precision | 別の精度の同じ重み | 不同精度的相同权重 | Те же веса в другой точности
dupes.precision_note | A file that is a plain cast of another (fp32 to fp16, bf16 or fp8): checked on its values, not guessed from names or sizes. | 別のファイルを単に型変換したファイル（fp32 から fp16、bf16、fp8）。名前やサイズから推測せず、値で確かめています。 | 只是另一个文件的简单类型转换（fp32 转 fp16、bf16 或 fp8）的文件：依据数值核对，而非根据名称或大小猜测。 | Файл, который является простым приведением другого (fp32 в fp16, bf16 или fp8): проверено по значениям, а не угадано по именам или размерам.
dupes.precision_label | Same weights as {name} | {name} と同じ重み | 与 {name} 权重相同 | Те же веса, что у {name}
dupes.precision_head | {name} and its casts · up to {size} reclaimable | {name} とその型変換 · 最大 {size} 回収可能 | {name} 及其类型转换 · 最多可回收 {size} | {name} и его приведения · можно освободить до {size}
dupes.precision_checked | (checked on {n} of {total} tensors) | （{total} 個中 {n} 個のテンソルで確認） | （已核对 {total} 个张量中的 {n} 个） | (проверено {n} из {total} тензоров)
dupes.verify | Verify every tensor | すべてのテンソルを確認 | 核对所有张量 | Проверить все тензоры
dupes.no_precision | No file is another's cast to a lower precision. | 別のファイルを低い精度へ変換しただけのファイルはありません。 | 没有文件只是另一个文件转换为更低精度的结果。 | Ни один файл не является приведением другого к меньшей точности.
dupes.undo_log | Undo log | 取り消し記録 | 撤销日志 | Журнал отмены
dupes.undone | (undone) | （取り消し済み） | （已撤销） | (отменено)
dupes.undo | Undo | 元に戻す | 撤销 | Отменить
dupes.nothing | Nothing moved yet. | まだ何も移動していません。 | 尚未移动任何文件。 | Пока ничего не перемещено.
dupes.in_trash | (system trash) | （システムのごみ箱） | （系统回收站） | (системная корзина)
dupes.in_quarantine | (quarantine) | （隔離フォルダー） | （隔离文件夹） | (карантин)
remove.trash | Move to the trash | ごみ箱へ移動 | 移到回收站 | В корзину
remove.quarantine | Move to quarantine | 隔離フォルダーへ移動 | 移到隔离文件夹 | В карантин
remove.confirm | {action}: {name}? | {action}: {name}? | {action}：{name}？ | {action}: {name}?
lora.title | Bake LoRAs into a model | モデルに LoRA を焼き込む | 将 LoRA 烘焙进模型 | Вшить LoRA в модель
lora.intro | The same as sdtk lora apply BASE LORA:STRENGTH[:TE_STRENGTH]… -o OUT: the LoRAs are applied in order, changed tensors computed in fp32 and cast once, the rest copied byte for byte. Nothing is written if a LoRA does not fit the base. | sdtk lora apply BASE LORA:STRENGTH[:TE_STRENGTH]… -o OUT と同じです。LoRA は順番に適用され、変わるテンソルは fp32 で計算して 1 回だけ変換し、残りはバイト単位でそのままコピーします。LoRA がベースに合わなければ何も書き込みません。 | 与 sdtk lora apply BASE LORA:STRENGTH[:TE_STRENGTH]… -o OUT 相同：LoRA 按顺序应用，被修改的张量以 fp32 计算并只转换一次，其余逐字节复制。若某个 LoRA 与基础模型不匹配，则不写入任何内容。 | То же, что sdtk lora apply BASE LORA:STRENGTH[:TE_STRENGTH]… -o OUT: LoRA применяются по порядку, изменённые тензоры считаются в fp32 и приводятся один раз, остальное копируется байт в байт. Если LoRA не подходит к базе, ничего не записывается.
lora.base | Base model | ベースモデル | 基础模型 | Базовая модель
lora.loras | LoRAs, in order | LoRA（適用順） | LoRA（按应用顺序） | LoRA по порядку
lora.n | LoRA {n} | LoRA {n} | LoRA {n} | LoRA {n}
lora.strength | Strength | 強度 | 强度 | Сила
lora.te_strength | Text encoder strength | テキストエンコーダーの強度 | 文本编码器强度 | Сила для текстового энкодера
lora.as_strength | as strength | 強度と同じ | 同强度 | как сила
lora.none | No LoRA in the library. | ライブラリに LoRA がありません。 | 库中没有 LoRA。 | В библиотеке нет LoRA.
lora.options | Options and output | オプションと出力 | 选项与输出 | Параметры и вывод
lora.dora | DoRA strength convention | DoRA の強度の扱い | DoRA 强度约定 | Соглашение о силе DoRA
lora.allow_unmatched | apply what matches, skip the rest | 合うものだけ適用し、残りは飛ばす | 只应用匹配的部分，跳过其余 | применить подходящее, остальное пропустить
lora.output | Output file name (beside the base; empty: named after the base and the LoRAs) | 出力ファイル名（ベースの隣。空欄ならベースと LoRA の名前から） | 输出文件名（与基础模型放在同一位置；留空则按基础模型和 LoRA 命名） | Имя выходного файла (рядом с базой; пусто — по именам базы и LoRA)
lmerge.title | Merge LoRAs | LoRA をマージ | 合并 LoRA | Слияние LoRA
lmerge.intro | The same as sdtk lora merge LORA:WEIGHT… -o OUT: the ranks are concatenated, so applying the result equals applying each LoRA at its weight (exact, no SVD). Only LoRA/LoCon modules of the same shapes can be merged; nothing is written otherwise. | sdtk lora merge LORA:WEIGHT… -o OUT と同じです。ランクを連結するので、結果を適用することは各 LoRA をその重みで適用することと同じです（厳密、SVD なし）。同じ形の LoRA/LoCon モジュールだけをマージでき、そうでなければ何も書き込みません。 | 与 sdtk lora merge LORA:WEIGHT… -o OUT 相同：秩被拼接，因此应用结果等同于按各自权重应用每个 LoRA（精确，无 SVD）。只能合并形状相同的 LoRA/LoCon 模块，否则不写入任何内容。 | То же, что sdtk lora merge LORA:WEIGHT… -o OUT: ранги объединяются, поэтому применение результата равно применению каждой LoRA с её весом (точно, без SVD). Сливать можно только модули LoRA/LoCon одинаковой формы; иначе ничего не записывается.
lmerge.weight | Weight | 重み | 权重 | Вес
lmerge.dtype | Output precision | 出力の精度 | 输出精度 | Точность результата
lmerge.widest | the widest input's | 入力のうち最も広いもの | 输入中最宽的 | как у самого широкого входа
lmerge.output | Output file name (beside the first LoRA; empty: named after the LoRAs) | 出力ファイル名（最初の LoRA の隣。空欄なら LoRA の名前から） | 输出文件名（与第一个 LoRA 放在同一位置；留空则按 LoRA 命名） | Имя выходного файла (рядом с первой LoRA; пусто — по именам LoRA)
lmerge.start | Start merging | マージを開始 | 开始合并 | Начать слияние
lresize.title | Resize {name} | {name} のランクを変更 | 调整 {name} 的秩 | Изменить ранг {name}
lresize.intro | The same as sdtk lora resize LORA -o OUT --rank R [--dynamic METHOD:X]: each module is factorized through QR and a small SVD (the singular values of a full SVD) and truncated. A dynamic method chooses each module's rank, up to the rank given, with kohya's conventions. | sdtk lora resize LORA -o OUT --rank R [--dynamic METHOD:X] と同じです。各モジュールを QR と小さな SVD（完全な SVD と同じ特異値）で分解して切り詰めます。動的な方法では、指定したランクを上限に kohya の規則で各モジュールのランクを選びます。 | 与 sdtk lora resize LORA -o OUT --rank R [--dynamic METHOD:X] 相同：每个模块经 QR 和小型 SVD（与完整 SVD 的奇异值相同）分解后截断。动态方法按 kohya 的约定为每个模块选择秩，上限为给定的秩。 | То же, что sdtk lora resize LORA -o OUT --rank R [--dynamic METHOD:X]: каждый модуль раскладывается через QR и малое SVD (сингулярные числа полного SVD) и усекается. Динамический метод выбирает ранг каждого модуля, не выше заданного, по соглашениям kohya.
lresize.rank | New rank (the cap with a dynamic method) | 新しいランク（動的な方法では上限） | 新的秩（动态方法时为上限） | Новый ранг (предел при динамическом методе)
lresize.current | Current rank: {rank} | 現在のランク: {rank} | 当前秩：{rank} | Текущий ранг: {rank}
lresize.dynamic | Dynamic rank | 動的なランク | 动态秩 | Динамический ранг
lresize.fixed | none (the same rank everywhere) | なし（すべて同じランク） | 无（处处相同的秩） | нет (везде один ранг)
lresize.param | Its number (sv_ratio: R, sv_fro / sv_cumulative: a fraction such as 0.9) | その数値（sv_ratio は R、sv_fro / sv_cumulative は 0.9 などの割合） | 其数值（sv_ratio 为 R，sv_fro / sv_cumulative 为 0.9 之类的比例） | Его число (sv_ratio: R, sv_fro / sv_cumulative: доля, например 0.9)
lresize.output | Output file name (beside the LoRA; empty: name-rankR.safetensors) | 出力ファイル名（LoRA の隣。空欄なら name-rankR.safetensors） | 输出文件名（与 LoRA 放在同一位置；留空则为 name-rankR.safetensors） | Имя выходного файла (рядом с LoRA; пусто — name-rankR.safetensors)
lresize.start | Start resizing | ランク変更を開始 | 开始调整 | Начать
lora.lbw | Block weights (lbw) | ブロック別の重み (lbw) | 分块权重 (lbw) | Веса по блокам (lbw)
lora.lbw_none | all blocks x1 | 全ブロック x1 | 所有块 x1 | все блоки x1
lora.lbw_hint | Block weights, as in LORA:STRENGTH:lbw=… of the CLI and A1111's LoRA Block Weight extension: 17 or 26 numbers (SD 1.x/2.x), 12 or 20 (SDXL), IN04=0.5,MID=0,… (the other blocks x1), or a preset name (NONE, ALL, INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL, ALL0.5: the extension's SD 1.x presets). | CLI の LORA:STRENGTH:lbw=… や A1111 の LoRA Block Weight 拡張と同じブロック別の重みです。17 または 26 個の数値（SD 1.x/2.x）、12 または 20 個（SDXL）、IN04=0.5,MID=0,…（他のブロックは x1）、またはプリセット名（NONE, ALL, INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL, ALL0.5：拡張の SD 1.x 用プリセット）。 | 分块权重，与 CLI 的 LORA:STRENGTH:lbw=… 及 A1111 的 LoRA Block Weight 扩展相同：17 或 26 个数（SD 1.x/2.x），12 或 20 个（SDXL），IN04=0.5,MID=0,…（其余块 x1），或预设名（NONE, ALL, INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL, ALL0.5：该扩展的 SD 1.x 预设）。 | Веса по блокам, как LORA:STRENGTH:lbw=… в CLI и в расширении LoRA Block Weight для A1111: 17 или 26 чисел (SD 1.x/2.x), 12 или 20 (SDXL), IN04=0.5,MID=0,… (остальные блоки x1) или имя пресета (NONE, ALL, INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL, ALL0.5 — пресеты расширения для SD 1.x).
lora.start | Start baking | 焼き込みを開始 | 开始烘焙 | Начать вшивание
error.title_tag | Not found | 見つかりません | 未找到 | Не найдено
error.title | Sorry | 申し訳ありません | 抱歉 | Извините
error.back | Back to the library | ライブラリに戻る | 返回模型库 | Назад в библиотеку
msg.queued | queued: {title} | 待機列に追加: {title} | 已加入队列：{title} | в очереди: {title}
msg.job | job #{id} | ジョブ #{id} | 任务 #{id} | задача #{id}
msg.moved_trash | moved {n} file(s) to the system trash ({batch}); undo below | {n} 個のファイルをシステムのごみ箱へ移動しました（{batch}）。下で元に戻せます | 已将 {n} 个文件移到系统回收站（{batch}）；可在下方撤销 | файлов перемещено в системную корзину: {n} ({batch}); отменить можно ниже
msg.moved_quarantine | moved {n} file(s) to the quarantine ({batch}); undo below | {n} 個のファイルを隔離フォルダーへ移動しました（{batch}）。下で元に戻せます | 已将 {n} 个文件移到隔离文件夹（{batch}）；可在下方撤销 | файлов перемещено в карантин: {n} ({batch}); отменить можно ниже
msg.no_trash | no system trash on this file's drive can be used; moved to the quarantine folder instead | このファイルのドライブでは使えるシステムのごみ箱がないため、代わりに隔離フォルダーへ移動しました | 该文件所在驱动器上没有可用的系统回收站，已改为移到隔离文件夹 | на диске этого файла нет доступной системной корзины; вместо неё — папка карантина
msg.moved_back | moved back: {names} | 元に戻しました: {names} | 已移回：{names} | возвращено: {names}
msg.remote | moving files is disabled while the server listens beyond this computer (--host); run sdtk serve without --host to remove duplicates | サーバーがこのコンピューターの外から接続を受けている間（--host）はファイルを移動できません。重複を削除するには --host なしで sdtk serve を起動してください | 服务器在本机以外监听（--host）时禁止移动文件；要移除重复文件，请不带 --host 运行 sdtk serve | перемещение файлов отключено, пока сервер доступен извне (--host); чтобы удалить дубликаты, запустите sdtk serve без --host
"""


def _parse(table: str) -> Dict[str, Dict[str, str]]:
    out: Dict[str, Dict[str, str]] = {}
    for line in table.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, *texts = [part.strip() for part in line.split(" | ")]
        if len(texts) != len(LANGS) or key in out:
            raise ValueError(f"ui_text: bad or repeated row {key!r}")
        out[key] = dict(zip(LANGS, texts))
    return out


UI: Dict[str, Dict[str, str]] = _parse(TABLE)


def ui(key: str, lang: str = "en", **values) -> str:
    """The label `key` in `lang` (English when the table has no such key or language), with values."""
    row = UI.get(key)
    text = (row.get(lang) or row["en"]) if row else key
    return text.format(**values) if values else text


def plural_form(n: int, lang: str) -> str:
    """one | few | many (CLDR cardinal rules for en, ja, zh, ru; "many" stands for "other")."""
    if lang == "ru":
        if n % 10 == 1 and n % 100 != 11:
            return "one"
        if 2 <= n % 10 <= 4 and not 12 <= n % 100 <= 14:
            return "few"
        return "many"
    if lang in ("ja", "zh"):
        return "many"
    return "one" if n == 1 else "many"


def ui_plural(key: str, n: int, lang: str = "en") -> str:
    """`key.one|few|many` for the count `n` (shown with thousands separators)."""
    return ui(f"{key}.{plural_form(n, lang)}", lang, n=f"{n:,}")


def choose_language(query: Optional[str], cookie: Optional[str], accept_language: Optional[str]) -> str:
    """?lang= first, then the cookie the language menu set, then Accept-Language, else English."""
    for value in (query, cookie):
        if value in LANGS:
            return value
    best, best_q = None, 0.0
    for part in (accept_language or "").split(",")[:20]:
        tag, _, params = part.strip().partition(";")
        code = tag.strip().lower().split("-")[0]
        try:
            q = float(params.strip()[2:]) if params.strip().startswith("q=") else 1.0
        except ValueError:
            q = 0.0
        if code in LANGS and q > best_q:
            best, best_q = code, q
    return best or "en"


def translator(lang: str):
    """`t(key, **values)` for templates, bound to one language; `t.plural(key, n)`."""
    def t(key: str, **values) -> str:
        return ui(key, lang, **values)

    t.plural = lambda key, n: ui_plural(key, n, lang)  # type: ignore[attr-defined]
    t.lang = lang  # type: ignore[attr-defined]
    return t
