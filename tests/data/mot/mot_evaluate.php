<?php
namespace Drupal\Core\StringTranslation {
  class TranslatableMarkup { public function __construct(public string $s) {} public function __toString(): string { return $this->s; } }
  trait StringTranslationTrait { protected function t($s, $a = [], $o = []) { return new TranslatableMarkup((string)$s); } }
}
namespace Drupal\Core\Entity { interface EntityTypeManagerInterface {} }
namespace Drupal\Core\Config { interface ConfigFactoryInterface {} }
namespace Drupal\mof {
  interface ModelInterface {}
  interface ComponentInterface {}
  interface ComponentManagerInterface {}
  interface LicenseHandlerInterface {}
  interface ModelEvaluatorInterface {}
  class FakeModel implements ModelInterface {
    public function __construct(public array $components, public array $licenses) {}
    public function getComponents(): ?array { return $this->components; }
    public function getLicenses(): ?array { return $this->licenses; }
  }
  class FakeLicense {
    public function __construct(public array $d) {}
    public function __toString(): string { return $this->d['id']; }
    public function getLicenseId(): string { return $this->d['id']; }
    public function isOsiApproved(): bool { return (bool)$this->d['osi']; }
    public function isFsfApproved(): bool { return (bool)$this->d['fsf']; }
    public function isDeprecated(): bool { return (bool)$this->d['dep']; }
    public function getContentType(): array { return $this->d['types']; }
  }
  class FakeStorage { public function __construct(public array $l) {} public function loadMultiple() { return $this->l; } }
  class FakeETM implements \Drupal\Core\Entity\EntityTypeManagerInterface {
    public function __construct(public array $l) {} public function getStorage($t) { return new FakeStorage($this->l); } }
  class FakeConfig { public function __construct(public array $c) {} public function get($k) { return $this->c; } }
  class FakeConfigFactory implements \Drupal\Core\Config\ConfigFactoryInterface {
    public function __construct(public array $c) {} public function get($k) { return new FakeConfig($this->c); } }
}
namespace {
  $src = '/tmp/mot/web/modules/mof/src/';
  require $src . 'Component.php';
  require $src . 'ComponentManager.php';
  require $src . 'LicenseHandler.php';
  require $src . 'ModelEvaluator.php';
  // LicenseImporter::import: licenses.json then mof-licenses.json, the second overriding by licenseId.
  $lic = [];
  foreach (['licenses.json', 'mof-licenses.json'] as $f) {
    $j = json_decode(file_get_contents('/tmp/mot/web/modules/mof/' . $f), true);
    foreach ($j['licenses'] as $l) {
      $ct = $l['ContentType'] ?? '';
      if (is_string($ct) && !empty($ct)) $ct = [$ct]; elseif (!is_array($ct)) $ct = [];
      $lic[$l['licenseId']] = new \Drupal\mof\FakeLicense(['id' => $l['licenseId'], 'osi' => $l['isOsiApproved'] ?? false,
        'fsf' => $l['isFsfLibre'] ?? '', 'dep' => $l['isDeprecatedLicenseId'], 'types' => $ct]);
    }
  }
  $cm = new \Drupal\mof\ComponentManager(new \Drupal\mof\FakeConfigFactory(json_decode(file_get_contents('components.json'), true)));
  $lh = new \Drupal\mof\LicenseHandler(new \Drupal\mof\FakeETM(array_values($lic)));
  $out = [];
  foreach (json_decode(file_get_contents('releases.json'), true) as $file => $rel) {
    // ModelUpdater::update + processComponentLicenses
    $licenses = ['global' => $rel['license'] ?? [], 'components' => []];
    foreach (($rel['components'] ?? []) as $cd) {
      $c = $cm->getComponentByName($cd['name']);
      $licenses['components'][$c->id] = [];
      foreach (['license', 'license_path', 'component_path'] as $key) {
        if (isset($cd[$key])) {
          $licenses['components'][$c->id][$key] = ($key === 'license' && $cd[$key] === 'unlicensed') ? '' : $cd[$key];
        }
      }
    }
    $model = new \Drupal\mof\FakeModel(array_keys($licenses['components']), $licenses);
    $ev = new \Drupal\mof\ModelEvaluator(new \Drupal\mof\FakeETM([]), $cm, $lh);
    $ev->setModel($model);
    $out[basename($file)] = ['class' => $ev->getClassification(false), 'progress' => [1 => $ev->getProgress(1), 2 => $ev->getProgress(2), 3 => $ev->getProgress(3)]];
  }
  echo json_encode($out, JSON_PRETTY_PRINT);
}
